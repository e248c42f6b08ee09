"""Time the task-grouping solvers, task clustering and representative selection (CPU, pure numpy).

* ``select_exact`` (branch and bound) at K in {8, 12, 16}, budget 2..4, on random TAG affinity matrices
  (Z ~ N(0, 1), TAG's singleton score): seconds and search nodes with the default exact tail (the last 10 tasks
  by subset convolution) and with branching only (``dp_tail=0``), candidates dropped as dominated, and
  ``select_beam``'s total against the optimum.
* ``select_beam`` at K = 30 and 60 (budget 3 and 5).
* candidate networks with their own costs (Standley et al. 2020's setting): HOA estimates for every task set at
  cost 1 plus a half-size single-task network per task at cost 0.5, budgets 1 to 3 in steps of 0.5, K in
  {5, 8, 10, 12}: ``select_exact`` (subset convolutions per cost) seconds, ``select_beam`` seconds and its total
  loss against the optimum, and how many half-size networks the optimum uses.
* ``cluster_tasks`` (STG-MTL: k-means + fuzzy memberships) on 100 and 500 tasks with synthetic data-map features,
  with the adjusted Rand index against the planted clusters.
* facility location (BenTo), k = 20 of K = 200 and K = 2000: lazy against plain (vectorised) greedy, same picks.

Prints one JSON object. Usage: ``python benchmarks/grouping.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from polytask.relations import (
    AffinityMatrix,
    Candidate,
    Candidates,
    HoaScore,
    TagScore,
    cluster_tasks,
    facility_location,
    select_beam,
    select_exact,
    select_representatives,
)


def tag_instance(k: int, seed: int) -> TagScore:
    z = np.random.default_rng(seed).normal(size=(k, k))
    return TagScore(AffinityMatrix(z, [f"t{i}" for i in range(k)], "random"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 4)


def bench_exact(ks: list[int], budgets: list[int]) -> list[dict]:
    rows = []
    for k in ks:
        for b in budgets:
            sc = tag_instance(k, seed=100 * k + b)
            g, sec = timed(lambda sc=sc, b=b: select_exact(sc, sc.tasks, b))
            pure, sec_pure = timed(lambda sc=sc, b=b: select_exact(sc, sc.tasks, b, dp_tail=0))
            beam, sec_beam = timed(lambda sc=sc, b=b: select_beam(sc, sc.tasks, b))
            assert abs(pure.total - g.total) < 1e-9
            rows.append({"K": k, "budget": b, "seconds": sec, "nodes": g.nodes,
                         "seconds_branching_only": sec_pure, "nodes_branching_only": pure.nodes,
                         "candidates": g.meta["candidates"], "dominated": g.meta["dominated"],
                         "total": round(g.total, 6), "groups": len(g.groups),
                         "beam_total": round(beam.total, 6), "beam_seconds": sec_beam})
    return rows


def bench_beam(ks: list[int], budgets: list[int]) -> list[dict]:
    rows = []
    for k in ks:
        for b in budgets:
            sc = tag_instance(k, seed=7 * k + b)
            g, sec = timed(lambda sc=sc, b=b: select_beam(sc, sc.tasks, b))
            rows.append({"K": k, "budget": b, "seconds": sec, "candidates": g.meta["candidates"],
                         "total": round(g.total, 6), "groups": len(g.groups)})
    return rows


def standley_instance(k: int, seed: int) -> Candidates:
    """HOA candidates from random pair losses at cost 1, and half-size single-task networks at cost 0.5 whose loss
    is the single-task loss times U(1.0, 1.3)."""
    rng = np.random.default_rng(seed)
    tasks = [f"t{i}" for i in range(k)]
    pairs = rng.uniform(0.5, 1.5, size=(k, k))
    full = Candidates.from_score(HoaScore(AffinityMatrix(pairs, tasks, "pairwise", higher_is_better=False)), tasks)
    half = [Candidate((t,), 0.5, {t: float(-pairs[i, i] * rng.uniform(1.0, 1.3))}, "half-size")
            for i, t in enumerate(tasks)]
    return full.extended(half)  # HOA candidates are in score units (negated losses): so are these


def bench_candidates(ks: list[int], budgets: list[float]) -> list[dict]:
    rows = []
    for k in ks:
        cands = standley_instance(k, seed=k)
        for b in budgets:
            ex, sec = timed(lambda cands=cands, b=b: select_exact(cands, cands.tasks, b))
            bm, sec_beam = timed(lambda cands=cands, b=b: select_beam(cands, cands.tasks, b))
            rows.append({"K": k, "budget": b, "candidates": len(cands.networks), "seconds": sec,
                         "convolutions": ex.meta["convolutions"], "total_loss": round(-ex.total, 6),
                         "cost": ex.total_cost, "half_size_chosen": ex.labels.count("half-size"),
                         "beam_seconds": sec_beam, "beam_total_loss_over_optimum": round(bm.total / ex.total, 6)})
    return rows


def data_maps(n_tasks: int, n_clusters: int, seed: int, n_samples: int = 200, n_epochs: int = 5):
    """Per task: per-sample mean confidence and variability over epochs; tasks of a cluster share hard samples."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_clusters, size=n_tasks)
    hardness = rng.uniform(-2, 2, size=(n_clusters, n_samples))
    epochs = np.linspace(0, 1.5, n_epochs)
    h = hardness[label] + 1.5 * rng.normal(size=(n_tasks, n_samples))
    conf = 1 / (1 + np.exp(h[:, None, :] - 2 * epochs[None, :, None]))
    return np.concatenate([conf.mean(1), conf.std(1)], axis=1), label


def bench_clustering(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        x, label = data_maps(n, 10, seed=n)
        tasks = [f"t{i}" for i in range(n)]
        out, sec = timed(lambda x=x, tasks=tasks: cluster_tasks(x, tasks, 10, seed=0))
        ari = adjusted_rand_score(label, [out.assignment[t] for t in tasks])
        rows.append({"tasks": n, "features": x.shape[1], "groups": 10, "seconds": sec, "ari": round(ari, 4)})
    return rows


def bench_facility(k: int, n: int) -> dict:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 16))
    sim = emb @ emb.T / 16
    lazy, t_lazy = timed(lambda: select_representatives(sim, k, lazy=True))
    plain, t_plain = timed(lambda: select_representatives(sim, k, lazy=False))
    return {"K": n, "k": k, "lazy_seconds": t_lazy, "plain_seconds": t_plain, "same_selection": lazy == plain,
            "objective": round(facility_location(sim, lazy), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    args = parser.parse_args()
    ks = [8, 12] if args.quick else [8, 12, 16]
    result = {
        "benchmark": "task grouping: exact branch and bound, beam, STG-MTL clustering, BenTo facility location",
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "numpy": np.__version__,
        "timing": "wall seconds of one call (perf_counter), no warm-up",
        "exact": bench_exact(ks, [2, 3, 4]),
        "beam": bench_beam([30] if args.quick else [30, 60], [3, 5]),
        "candidates_with_costs": bench_candidates([5, 8] if args.quick else [5, 8, 10, 12], [1.0, 1.5, 2.0, 2.5, 3.0]),
        "clustering": bench_clustering([100] if args.quick else [100, 500]),
        "facility_location": [bench_facility(20, 200), bench_facility(20, 2000)],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
