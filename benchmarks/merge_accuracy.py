"""Every merge method on MNIST-family tasks, end to end, as JSON: per-task and normalised accuracy.

The six ``digit-attributes`` tasks (digit, even, ge5, prime, loop, mod3 of one 8x8 scikit-learn digit): a
backbone is pretrained on all tasks jointly on 30% of the training rows, one model per task is fine-tuned
from it on the other 70%, and the fine-tuned encoders are merged with every registered method (each task
keeps its own head). Methods with a ``lambda`` pick it on the validation split from a small grid (as
Ilharco et al. and Yadav et al. do); the test accuracies are reported as measured, with the individually
fine-tuned models (normalised accuracy 1) and the pretrained backbone as references.

    python benchmarks/merge_accuracy.py [--seed 0] [--tiny] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from polytask.flows.merge import run_merge_experiment
from polytask.merging import ExperimentConfig

LAMBDAS = [0.3, 0.5, 0.7, 1.0]

METHODS = [
    {"name": "average"},
    {"name": "task_arithmetic", "grid": {"lambda": LAMBDAS}},
    {"name": "ties", "params": {"density": 0.2}, "grid": {"lambda": [0.5, 0.7, 1.0, 1.5]}},
    {"name": "dare", "params": {"drop_rate": 0.5}, "grid": {"lambda": LAMBDAS}},
    {"name": "dare_ties", "params": {"drop_rate": 0.5, "density": 0.5}, "grid": {"lambda": [0.5, 0.7, 1.0, 1.5]}},
    {"name": "breadcrumbs", "params": {"density": 0.8, "gamma": 0.01}, "grid": {"lambda": LAMBDAS}},
    {"name": "metagpt"},
    {"name": "lwptv", "grid": {"threshold": [0.5, 0.8, 1.0], "base_params": [{"lambda": v} for v in LAMBDAS]}},
    {"name": "fisher", "params": {"n_examples": 256}},
    {"name": "regmean", "params": {"n_examples": 256, "alpha": 0.9}},
    {"name": "adamerging", "params": {"steps": 200, "lr": 0.01}},
    {"name": "divmerge", "params": {"steps": 200, "lr": 0.01}},
]


def config(seed: int, tiny: bool, out: Path) -> ExperimentConfig:
    methods = METHODS
    if tiny:
        methods = [{**m, "params": {**m.get("params", {}), **({"steps": 5} if m["name"] in
                                                              ("adamerging", "divmerge") else {})}} for m in METHODS]
    return ExperimentConfig.model_validate({
        "seed": seed,
        "suite": {"name": "digit-attributes"},
        "model": {"backbone": "mlp", "backbone_params": {"hidden": [128, 64]}},
        "train": {"batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}, "checkpoint_every": 0,
                  "threads": 2},
        "pretrain": {"fraction": 0.3, "epochs": 2 if tiny else 10},
        "finetune": {"epochs": 2 if tiny else 20},
        "methods": methods,
        "data": {"n_examples": 256},
        "output": {"dir": str(out.parent), "name": out.name},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a few epochs and steps (a smoke run)")
    ap.add_argument("--dir", default=None, help="keep the run directory here")
    args = ap.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="merge-accuracy-"))
    t = time.perf_counter()
    try:
        _run_dir, summary = run_merge_experiment(config(args.seed, args.tiny, root / "run"))
        table = {
            label: {"method": r["method"], "params": r["params"],
                    "accuracy": {k: round(v["accuracy"], 4) for k, v in r["tasks"].items()},
                    "normalized": {k: round(v, 4) for k, v in r["normalized"].items()},
                    "mean_accuracy": round(r["mean"], 4), "mean_normalized": round(r["mean_normalized"], 4),
                    "merge_seconds": round(r["seconds"], 3)}
            for label, r in summary["results"].items()
        }
        print(json.dumps({"benchmark": "merge_accuracy", "suite": "digit-attributes",
                          "tasks": [x["name"] for x in summary["tasks"]], "seed": args.seed, "tiny": args.tiny,
                          "pretrain": "all tasks, 30% of training rows", "finetune": "70% of training rows",
                          "wall_s": round(time.perf_counter() - t, 1), "results": table}, indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
