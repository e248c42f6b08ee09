"""Is the trained DSMTL no worse than single-task on any task? (issue 11; Yue, Ye, Zhang, Liang & Tsang 2022,
"Deep Safe Multi-Task Learning", arXiv:2111.10601). Prints one JSON object.

On the ``synthetic`` suite (a group of related tasks, unrelated tasks and a conflicting pair, y_b = -y_a), for every
seed one ``polytask run`` (flow ``compare``) trains the single-task baselines (one ``hard`` network per task) and,
for every architecture, every joint method. Reported per architecture x method (labels ``<arch>/<method>``): each
task's Δ% against its single-task model (the per-task term of Δm%, positive is worse; mean ± std over seeds and the
per-seed values), how many tasks end worse than single-task per seed (Δ% > 0, strictly, no significance test), the
worst task's Δ%, Δm% and the wall time; for ``dsmtl`` also each task's learned gate alpha_t (weight of the public
representation) at the end of training, read from the job's best checkpoint. The yardstick for "worse":
``stl_reference_delta_pct``, the per-task Δ% of a second set of single-task networks (another model seed, the same
data) against the first, i.e. how far single-task training itself moves between initialisations.

    python benchmarks/dsmtl_safety.py [--archs hard dsmtl] [--methods equal upgrad_rep] [--seeds 0 1 2]
                                      [--epochs 10] [--hidden 32] [--suite-params '{"groups": [3]}']
                                      [--arch-params '{"dsmtl": {"gate": "hard"}}'] [--out /tmp/dsmtl-safety]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from architecture_study import finished  # benchmarks/ is on the path of a script run from there

METHODS = {"equal": {"name": "equal"},
           "upgrad_rep": {"name": "upgrad", "grad_mode": "representation", "label": "upgrad_rep"}}
SUITE = {"d": 16, "hidden": 32, "groups": [3], "unrelated": 2, "conflicting_pairs": 1, "noise": 0.1,
         "n_train": 2000, "n_val": 500, "n_test": 1000}


def synthetic_data(data_seed: int = 0, **params: Any) -> Any:
    """The ``synthetic`` suite drawn with ``data_seed`` whatever the run's seed (the suite factory of the runs, so a
    second single-task run with another model seed sees the same data)."""
    from polytask.tasks.registry import build_suite

    return build_suite("synthetic", params, data_seed)


def config(arch: str, seed: int, args: argparse.Namespace, methods: list[dict[str, Any]], single_task: bool,
           name: str, model_seed: int | None = None) -> Any:
    """The compare run of ``arch`` with ``methods`` on the synthetic suite drawn with ``seed`` (with single-task
    baselines or not); the run's (model) seed is ``model_seed``, default ``seed``."""
    from polytask.config import Config, check
    from polytask.registry import validate_model

    suite = {**SUITE, **json.loads(args.suite_params), "data_seed": seed}
    data = {"flow": "compare", "seed": seed if model_seed is None else model_seed,
            "suite": {"factory": "dsmtl_safety:synthetic_data", "params": suite},
            "model": {"backbone": "mlp", "backbone_params": {"hidden": args.hidden}, "architecture": arch,
                      "architecture_params": json.loads(args.arch_params).get(arch, {})},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size,
                      "optimizer": {"name": "adam", "lr": args.lr}, "threads": 1},
            "methods": methods, "baselines": {"single_task": single_task, "cache": False},
            "output": {"dir": str(Path(args.out) / "runs"), "name": name}}
    return check(validate_model(Config, data))


def gates(run_dir: Path, label: str, scale: float) -> dict[str, float] | None:
    """The soft gate weights alpha_t = sigmoid(scale * a_t) of job ``label``'s best checkpoint (the model whose
    scores the summary reports; else its last), or None when not found."""
    import torch
    from safetensors.torch import load_file

    from polytask.engine import checkpoint

    job = run_dir / "jobs" / label
    if (job / "best.safetensors").is_file():  # the best weights, a plain state dict
        state = load_file(job / "best.safetensors")
    elif (job / "last.safetensors").is_file():  # the engine's checkpoint
        state = checkpoint.load(job / "last.safetensors").get("model", {})
    else:
        return None
    return {k.removeprefix("gates."): round(float(torch.sigmoid(scale * v)), 4) for k, v in state.items()
            if k.startswith("gates.")} or None


def mean_std(xs: list[float]) -> dict[str, float]:
    """Mean, sample std and count, rounded."""
    return {"mean": round(statistics.fmean(xs), 3), "std": round(statistics.stdev(xs), 3) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def directions(summary: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """Each task's metrics and whether higher is better, from a run summary."""
    return {t["name"]: {m["name"]: bool(m["higher_is_better"]) for m in t["metrics"]}
            for t in summary["suite"]["tasks"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="*", default=["hard", "dsmtl"])
    ap.add_argument("--methods", nargs="*", default=["equal", "upgrad_rep"], choices=list(METHODS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", nargs="*", type=int, default=[32])
    ap.add_argument("--suite-params", default="{}", help="JSON: synthetic suite parameters over the defaults")
    ap.add_argument("--arch-params", default="{}", help="JSON: architecture -> architecture_params")
    ap.add_argument("--out", default="/tmp/dsmtl-safety")
    ap.add_argument("--tag", default="", help="suffix of the architecture runs' names (the single-task runs are "
                    "shared by every tag in --out)")
    args = ap.parse_args()

    import torch

    from polytask.evaluation.delta import delta_m
    from polytask.models.dsmtl import DSMTLParams

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [METHODS[m] for m in args.methods]
    per: dict[str, dict[str, Any]] = {}
    stl_scores: dict[int, Any] = {}
    stl_ref: dict[str, list[float]] = {}
    for seed in args.seeds:
        t = time.perf_counter()
        _, summary = finished(config("hard", seed, args, methods[:1], True, f"stl-s{seed}"), out)
        stl = summary["results"]["stl"]["tasks"]
        stl_scores[seed] = stl
        dirs = directions(summary)
        _, ref = finished(config("hard", seed, args, methods[:1], True, f"stl-ref-s{seed}", seed + 1000), out)
        _, per_task = delta_m(ref["results"]["stl"]["tasks"], stl, dirs)
        for task, v in per_task.items():
            stl_ref.setdefault(task, []).append(v)
        print(json.dumps({"seed": seed, "stl_s": round(time.perf_counter() - t, 1)}), file=sys.stderr)
        for arch in args.archs:
            t = time.perf_counter()
            run_dir, summary = finished(config(arch, seed, args, methods, False, f"{arch}{args.tag}-s{seed}"), out)
            for label, r in summary["results"].items():
                d, per_task = delta_m(r["tasks"], stl, dirs)
                rec = per.setdefault(f"{arch}/{label}", {"delta_m": [], "per_task": {}, "worse": [], "worst": [],
                                                         "wall_s": [], "alpha": []})
                rec["delta_m"].append(d)
                for task, v in per_task.items():
                    rec["per_task"].setdefault(task, []).append(v)
                rec["worse"].append(sorted(task for task, v in per_task.items() if v > 0))
                rec["worst"].append(max(per_task.values()))
                rec["wall_s"].append(r["wall_time_s"])
                if arch == "dsmtl":
                    scale = DSMTLParams(**json.loads(args.arch_params).get("dsmtl", {})).gate_scale
                    rec["alpha"].append(gates(run_dir, label, scale))
            print(json.dumps({"seed": seed, "arch": arch, "s": round(time.perf_counter() - t, 1)}), file=sys.stderr)
    results = {}
    for key, rec in per.items():
        results[key] = {
            "delta_m": mean_std(rec["delta_m"]),
            "task_delta_pct": {task: {**mean_std(v), "per_seed": [round(x, 2) for x in v]}
                               for task, v in rec["per_task"].items()},
            "tasks_worse_than_stl_per_seed": rec["worse"],
            "n_worse_per_seed": [len(w) for w in rec["worse"]],
            "worst_task_delta_pct": mean_std(rec["worst"]),
            "wall_s": round(statistics.fmean(rec["wall_s"]), 1),
        }
        if any(a is not None for a in rec["alpha"]):
            results[key]["alpha_public_per_seed"] = rec["alpha"]
    stl_mse = {task: mean_std([s[task]["mse"] for s in stl_scores.values()])
               for task in next(iter(stl_scores.values()))} if stl_scores else {}
    print(json.dumps({"benchmark": "dsmtl_safety", "suite": {**SUITE, **json.loads(args.suite_params)},
                      "seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                      "hidden": args.hidden, "methods": methods, "arch_params": json.loads(args.arch_params),
                      "stl_test_mse": stl_mse,
                      "stl_reference_delta_pct": {task: {**mean_std(v), "per_seed": [round(x, 2) for x in v]}
                                                  for task, v in stl_ref.items()},
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
