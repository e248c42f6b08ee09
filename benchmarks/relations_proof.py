"""Which tasks belong together, measured: every affinity estimator against the pairwise ground truth
(Spearman), the planted-group recovery, and the trained comparison of the chosen grouping with
all-in-one, independent and random groupings, on three suites: synthetic (planted groups), digit-attributes,
and a table file (scikit-learn's breast-cancer data written to CSV, five columns as tasks).
Prints one JSON object. Usage: python benchmarks/relations_proof.py [--out runs/proof] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from polytask.config import load_config
from polytask.engine.progress import Reporter
from polytask.relations.workflow import group, relate

EXAMPLE = Path(__file__).parents[1] / "examples" / "synthetic_groups.yaml"
ALL = ["lookahead", "grad_cosine", "datamap", "pairwise"]
FROZEN = ["logme", "leep", "hscore", "nce"]


def breast_cancer_csv(path: Path) -> dict[str, str]:
    """A user-style table: the diagnosis and four measurements as tasks, the other columns as features."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame.to_csv(path, index=False)
    return {"target": "classification", "mean_radius": "regression", "mean_texture": "regression",
            "worst_smoothness": "regression", "mean_concavity": "regression"}


def suites(out: Path) -> dict[str, dict]:
    syn = yaml.safe_load(EXAMPLE.read_text())
    csv = out / "breast_cancer.csv"
    targets = breast_cancer_csv(csv)
    base = {"model": {"backbone_params": {"hidden": [64, 16]}},
            "train": {"epochs": 20, "batch_size": 32, "optimizer": {"lr": 0.003}}}
    return {
        "synthetic": syn,
        "digit-attributes": base | {"suite": {"name": "digit-attributes"},
                                    "relate": {"estimators": ALL + FROZEN}, "group": {"budget": 2}},
        "table": base | {"suite": {"name": "table", "params": {"path": str(csv), "targets": targets}},
                         "relate": {"estimators": [*ALL, "logme"]}, "group": {"budget": 2}},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/relations-proof")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report: dict = {}
    for name, raw in suites(out).items():
        raw = dict(raw)
        raw["output"] = {"dir": str(out), "name": name}
        raw.setdefault("group", {})
        raw["group"] = {**raw["group"], "seeds": args.seeds, "estimator": "lookahead"}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        config = load_config(out / f"{name}.yaml")
        run_dir, affs = relate(config, reporter=Reporter(quiet=True))
        truth = affs["pairwise"]
        _, summary = group(None, resume=str(run_dir), reporter=Reporter(quiet=True))
        planted = summary.get("planted_groups")
        chosen = [set(g) for g in summary["grouping"]["groups"]]
        recovered = None
        if planted:
            multi = [set(g) for g in planted if len(g) > 1]
            recovered = all(sum(p <= c for c in chosen) == 1 for p in multi) and all(
                sum(bool(c & p) for p in multi) == 1 for c in chosen)
        report[name] = {
            "spearman_vs_pairwise": {k: round(a.spearman(truth), 3) for k, a in affs.items() if k != "pairwise"},
            "estimator_wall_time_s": {k: round(a.cost.get("wall_time_s", a.cost.get("probe_time_s", 0.0)), 2)
                                      for k, a in affs.items()},
            "lookahead_overhead_ratio": affs["lookahead"].cost.get("overhead_ratio"),
            "chosen_groups": summary["grouping"]["groups"],
            "planted_groups": planted,
            "planted_recovered": recovered,
            "total_val_loss": {k: [round(v["total_val_loss_mean"], 4), round(v["total_val_loss_std"], 4)]
                               for k, v in summary["strategies"].items()},
            "run_dir": str(run_dir),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
