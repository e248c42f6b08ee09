"""Wall time of ``polytask relate`` with the pairwise estimator (K single-task + K(K-1)/2 pair models) on the
sequential executor vs Ray with 1 and with 2 workers, interleaved, as JSON.

One local Ray cluster is started in this process (``--cpus`` CPUs) and warmed up by one untimed Ray relate, so its
worker processes exist before timing (a first call pays their start: importing torch in each), and by one untimed
sequential relate (this process's own first-call costs: lazy imports, allocator warm-up). Each round times the
three variants, in an order that rotates every round (a slow spell of a shared machine hits each alike), each on a
fresh run directory with the single-task cache off; every job uses one torch thread (``train.threads: 1``). Ratios
are taken within a round (sequential / ray-1, sequential / ray-2, ray-1 / ray-2: speed-ups) and reported as median
with min and max over rounds; the 1-minute load average at the start of each round is recorded. Every variant's
affinity matrix is checked to equal the sequential one bit for bit.

    python benchmarks/ray_relate.py [--rounds 5] [--tasks 4] [--epochs 5] [--n-train 4000] [--cpus 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {"sequential": {"name": "sequential"}, "ray-1": {"name": "ray", "workers": 1},
            "ray-2": {"name": "ray", "workers": 2}}
RATIOS = {"sequential/ray-1": ("sequential", "ray-1"), "sequential/ray-2": ("sequential", "ray-2"),
          "ray-1/ray-2": ("ray-1", "ray-2")}


def config(out: Path, name: str, executor: dict, args: argparse.Namespace):
    """The relate experiment: a synthetic suite of ``args.tasks`` tasks (one related pair, the rest unrelated)."""
    from polytask.config import Config

    return Config.model_validate({
        "seed": 0,
        "suite": {"name": "synthetic", "params": {"d": 16, "groups": [2], "unrelated": args.tasks - 2,
                                                  "conflicting_pairs": 0, "n_train": args.n_train, "n_val": 500,
                                                  "n_test": 500}},
        "model": {"backbone": "mlp", "backbone_params": {"hidden": [64, 32]}},
        "train": {"epochs": args.epochs, "batch_size": 64, "threads": 1, "checkpoint_every": 0},
        "methods": ["equal"], "baselines": {"cache": False},
        "relate": {"estimators": ["pairwise"]},
        "output": {"dir": str(out), "name": name}, "executor": executor,
    })


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "ray_relate.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    import ray

    from polytask.engine.progress import Reporter
    from polytask.flows.relate import relate

    out = args.dir or Path(tempfile.mkdtemp(prefix="ray-relate-"))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - t0
    quiet = Reporter(quiet=True)
    t0 = time.perf_counter()
    relate(config(out, "warmup", VARIANTS["ray-2"], args), reporter=quiet)
    warmup = time.perf_counter() - t0
    relate(config(out, "warmup-sequential", VARIANTS["sequential"], args), reporter=quiet)  # this process's first

    names = list(VARIANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads, reference = [], None
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            _, aff = relate(config(out, f"{name}-{r}", VARIANTS[name], args), reporter=quiet)
            times[name].append(time.perf_counter() - t0)
            matrix = aff["pairwise"].matrix.tolist()
            reference = reference or matrix
            assert matrix == reference, f"{name} round {r}: the affinity differs from the first variant's"
    ratios = {k: spread([a / b for a, b in zip(times[x], times[y], strict=True)]) for k, (x, y) in RATIOS.items()}
    result = {
        "benchmark": "ray_relate", "jobs": args.tasks + args.tasks * (args.tasks - 1) // 2,
        "setup": {"tasks": args.tasks, "epochs": args.epochs, "n_train": args.n_train, "hidden": [64, 32],
                  "batch_size": 64, "threads_per_job": 1, "ray_cpus": args.cpus, "rounds": args.rounds},
        "seconds": {n: spread(v) for n, v in times.items()}, "raw_seconds": times, "ratios": ratios,
        "identical_affinity": True, "ray_startup_s": startup, "ray_warmup_relate_s": warmup,
        "load_1min_at_round_start": loads, "cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
    }
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
