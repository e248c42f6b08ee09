"""Wall-time overhead of lookahead (TAG) affinity riding on a joint run, measured interleaved in one process.

The same joint run (synthetic suite, K tasks, equal weighting) is timed with and without the probe: each
repeat runs every variant once (plain, lookahead, lookahead + gradient cosine), in an order rotated from
repeat to repeat, and a variant's ratio is taken against the plain run of the same repeat; prints one JSON
object with the median ratio and its spread (min, max) over the repeats (target: <= 1.30 at every=10, K=8).
Usage: python benchmarks/affinity_overhead.py [--k 8] [--every 10] [--repeats 5] [--warmup 1] [--hidden 256 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from polytask.config import Config, MethodConfig
from polytask.flows.jobs import Job, train_configured
from polytask.relations.probes import GradCosine, Lookahead, ProbeSet
from polytask.tasks import build_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
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
    names = list(times)

    def run(name: str) -> float:
        hooks = []
        if name != "plain":
            hooks = [ProbeSet([Lookahead(args.every)] + ([GradCosine(args.every)] if "cosine" in name else []))]
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train_configured(job, suite, config, Path(d), hooks=hooks)
            return time.perf_counter() - t0

    for _ in range(args.warmup):  # imports and first-call costs, not timed
        for name in names:
            run(name)
    for r in range(args.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run(name))

    def spread(xs: list[float]) -> dict:
        return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}

    ratios = {name: spread([t / p for t, p in zip(times[name], times["plain"], strict=True)])
              for name in names if name != "plain"}
    print(json.dumps({
        "setup": f"synthetic K={args.k}, MLP {args.hidden}, batch 128, {args.epochs} epochs, probe every "
                 f"{args.every} steps, 1 thread; {args.repeats} interleaved repeats (order rotated), ratio paired "
                 "with the plain run of the same repeat",
        "seconds": {name: spread(ts) for name, ts in times.items()},
        "ratio_lookahead": ratios["lookahead"],
        "ratio_lookahead_and_cosine": ratios["lookahead+grad_cosine"],
        "target_ratio": 1.30,
    }, indent=1))


if __name__ == "__main__":
    main()
