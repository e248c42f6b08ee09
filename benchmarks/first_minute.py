"""The first minute: wall time of the default experiment (`polytask run`, no config) with a cold cache, as a new
user runs it, and the verdict it printed. Prints one JSON object.

Usage: python benchmarks/first_minute.py [--repeats 3]   (each repeat: fresh cache and run directory)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def once(workdir: Path) -> dict:
    env = dict(os.environ, POLYTASK_CACHE_DIR=str(workdir / "cache"))
    env.pop("POLYTASK_KILL_AT", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "polytask.cli", "run", "--quiet"], cwd=workdir, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"polytask run failed:\n{r.stderr}")
    verdict = next(line for line in r.stdout.splitlines() if line.startswith("verdict: "))[len("verdict: "):]
    summary = json.loads(next((workdir / "runs").glob("*/summary.json")).read_text())
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "training_s": summary["wall_time_s"], "verdict": verdict, "plan": summary["verdict"]["plan"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            runs.append(once(Path(d)))
    walls = [r["wall_s"] for r in runs]
    print(json.dumps({
        "benchmark": "first_minute", "command": "polytask run (no config, cold cache)", "target_s": 60,
        "wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
        "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
        "training_s_median": statistics.median(r["training_s"] for r in runs),
        "within_target": max(walls) <= 60, "verdicts_identical": len({r["verdict"] for r in runs}) == 1,
        "verdict": runs[0]["verdict"], "cores": os.cpu_count(), "python": platform.python_version(),
        "load_avg_1min": os.getloadavg()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
