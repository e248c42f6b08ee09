"""Time every registered aggregator on random K x P float32 Jacobians (CPU, one thread).

For each (aggregator, K, P) it reports the K x K solve alone (``update`` on a precomputed float64 Gramian, the
part each method owns) and the full ``aggregate`` call (float64 Gramian J J^T, solve, J^T w). Jacobian methods
(GradDrop, DB-MTL) have no K x K solve. Targets: every K x K solve under 1 ms at K = 10, Nash-MTL under 5 ms.

Prints one JSON object. Usage: ``python benchmarks/solvers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from polytask.aggregators import aggregate, build_aggregator
from polytask.methods import load_all
from polytask.weighting.base import StepContext

TARGET_MS = {"default": 1.0, "nashmtl": 5.0}


def ctx_for(k: int, step: int) -> StepContext:
    return StepContext(step=step, epoch=0, losses=torch.linspace(1.0, 2.0, k, dtype=torch.float64),
                       generator=torch.Generator().manual_seed(step))


def time_calls(fn, repeats: int) -> list[float]:
    """Wall times in ms of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench(name: str, jac: torch.Tensor, solve_repeats: int, full_repeats: int) -> dict:
    k = jac.shape[0]
    agg = build_aggregator(name, None, [f"t{i}" for i in range(k)])
    state = {"s": agg.init(), "step": 0}

    def full() -> None:
        state["step"] += 1
        _, state["s"] = aggregate(agg, jac, state=state["s"], ctx=ctx_for(k, state["step"]))

    full_ms = time_calls(full, full_repeats)
    row = {"aggregator": name, "K": k, "P": jac.shape[1], "input": agg.input,
           "aggregate_ms": round(statistics.median(full_ms), 3), "solve_ms": None, "solve_ms_p90": None}
    if agg.input == "gramian":
        j64 = jac.double()
        gram = j64 @ j64.T

        def solve() -> None:
            state["step"] += 1
            _, state["s"] = agg.update(state["s"], gram, ctx_for(k, state["step"]))

        solve_ms = time_calls(solve, solve_repeats)
        row["solve_ms"] = round(statistics.median(solve_ms), 4)
        row["solve_ms_p90"] = round(float(np.percentile(solve_ms, 90)), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P = 1e4 only and fewer repeats (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [e.name for e in load_all() if e.extra.get("kind") == "aggregator"]
    sizes = [10_000] if args.quick else [100_000, 1_000_000]
    rows = []
    for k in (2, 5, 10):
        for p in sizes:
            jac = torch.randn(k, p, generator=torch.Generator().manual_seed(k * 7 + p))
            for name in names:
                rows.append(bench(name, jac, solve_repeats=20 if args.quick else 200,
                                  full_repeats=2 if args.quick else (5 if p <= 100_000 else 3)))
    verdict = {}
    for name in names:
        solves = [r["solve_ms"] for r in rows if r["aggregator"] == name and r["K"] == 10 and r["solve_ms"]]
        if solves:
            limit = TARGET_MS.get(name, TARGET_MS["default"])
            verdict[name] = {"worst_median_solve_ms_at_K10": max(solves), "target_ms": limit,
                             "met": max(solves) < limit}
    print(json.dumps({
        "benchmark": "aggregator K x K solve and full aggregate, random Gaussian Jacobians",
        "device": f"cpu ({platform.processor() or platform.machine()})", "threads": torch.get_num_threads(),
        "dtype": "float32", "torch": torch.__version__, "numpy": np.__version__,
        "timing": "median ms over repeated calls after one warm-up; solve = update() on a precomputed float64 "
                  "Gramian (includes the input check and the torch<->numpy transfer)",
        "targets": verdict, "all_targets_met": all(v["met"] for v in verdict.values()), "results": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
