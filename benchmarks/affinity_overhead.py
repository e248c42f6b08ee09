"""Wall-time overhead of lookahead (TAG) affinity riding on a joint run, measured in one process.

The same joint run (synthetic suite, K tasks, equal weighting) is timed with and without the probe,
alternating, several repeats; prints one JSON object with the ratio (target: <= 1.30 at every=10, K=8).
Usage: python benchmarks/affinity_overhead.py [--k 8] [--every 10] [--repeats 3] [--hidden 256 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from polytask.config import Config, MethodConfig
from polytask.engine.loop import Job, train_job
from polytask.relations.probes import GradCosine, Lookahead, ProbeSet
from polytask.tasks import build_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
    args = ap.parse_args()
    torch.set_num_threads(1)
    groups = [args.k // 2, args.k - args.k // 2]
    suite = build_suite("synthetic", {"d": 32, "groups": groups, "unrelated": 0, "conflicting_pairs": 0,
                                      "n_train": 4000, "n_val": 500, "n_test": 500}, seed=0)
    config = Config.model_validate({"model": {"backbone_params": {"hidden": args.hidden}},
                                    "train": {"epochs": args.epochs, "batch_size": 128, "checkpoint_every": 0}})
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    times: dict[str, list[float]] = {"plain": [], "lookahead": [], "lookahead+grad_cosine": []}
    for _ in range(args.repeats):
        for name in times:
            probes = None
            if name != "plain":
                probes = ProbeSet([Lookahead(args.every)] + ([GradCosine(args.every)] if "cosine" in name else []))
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                train_job(job, suite, config, Path(d), probes=probes)
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({
        "setup": f"synthetic K={args.k}, MLP {args.hidden}, batch 128, {args.epochs} epochs, probe every "
                 f"{args.every} steps, 1 thread; min of {args.repeats} alternating repeats",
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "ratio_lookahead": round(best["lookahead"] / best["plain"], 3),
        "ratio_lookahead_and_cosine": round(best["lookahead+grad_cosine"] / best["plain"], 3),
        "target_ratio": 1.30,
    }, indent=1))


if __name__ == "__main__":
    main()
