"""Which tasks belong together, measured: every affinity estimator against the pairwise ground truth
(Spearman), each estimator's own cost, the planted-group recovery, and the trained comparison of the chosen
grouping with all-in-one, independent and random groupings, on three suites: synthetic (planted groups),
digit-attributes, and a table file (scikit-learn's breast-cancer data written to CSV, five columns as tasks).

The TAG lookahead is reported in both forms, on the same joint run: the paper's step (the default, ``lookahead``)
and the step of the run's optimiser with its momentum / Adam moments (``lookahead_optimizer``, from a second relate
run with ``relate.lookahead_update: optimizer``), each with its Spearman against pairwise and the share of its
off-diagonal variance explained by the target column (how much one column's shared scale dominates the matrix).
Every estimator also gets the within-target Spearman (per target column, averaged), which is what TAG's group
score reads: a per-target offset shifts all of that target's groups alike.

Prints one JSON object. Usage: python benchmarks/relations_proof.py [--out runs/proof] [--seeds 0 1 2]
[--suites synthetic ...] [--relate-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from polytask.config import load_config
from polytask.engine.progress import Reporter
from polytask.flows.group import group
from polytask.flows.relate import relate
from polytask.relations import AffinityMatrix, spearman_rho

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


def column_share(matrix: np.ndarray) -> float:
    """Share of the off-diagonal variance explained by the target column (the column means of the off-diagonal
    entries): 1 when every column is constant, 0 when the columns carry no shared level."""
    off = ~np.eye(len(matrix), dtype=bool)
    z = np.where(off, matrix, np.nan)
    fitted = np.broadcast_to(np.nanmean(z, axis=0)[None, :], z.shape)[off]
    values, grand = z[off], np.nanmean(z[off])
    total = float(((values - grand) ** 2).sum())
    return float(((fitted - grand) ** 2).sum() / total) if total > 0 else float("nan")


def within_target_spearman(aff: AffinityMatrix, truth: AffinityMatrix) -> float:
    """Mean over target tasks j of the Spearman correlation of the sources' effects on j (column j without its
    diagonal): what TAG's group score reads, since a per-target offset shifts every group of j alike."""
    a, t = aff.subset(truth.tasks).oriented(), truth.oriented()
    k = len(truth.tasks)
    rhos = [spearman_rho(a[[i for i in range(k) if i != j], j], t[[i for i in range(k) if i != j], j])
            for j in range(k)]
    return float(np.nanmean(rhos))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/relations-proof")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--suites", nargs="+", default=["synthetic", "digit-attributes", "table"])
    ap.add_argument("--relate-only", action="store_true", help="estimators only: skip the trained grouping proof")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report: dict = {}
    for name, raw in suites(out).items():
        if name not in args.suites:
            continue
        raw = dict(raw)
        raw["output"] = {"dir": str(out), "name": name}
        raw.setdefault("group", {})
        raw["group"] = {**raw["group"], "seeds": args.seeds, "estimator": "lookahead"}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        config = load_config(out / f"{name}.yaml")
        run_dir, affs = relate(config, reporter=Reporter(quiet=True))
        # the optimiser-rule lookahead on the same joint run (same seed and config: the run is identical)
        rule = config.model_copy(deep=True)
        rule.relate.estimators = ["lookahead"]
        rule.relate.lookahead_update = "optimizer"
        rule.output.name = f"{name}-lookahead-optimizer"
        _, rule_affs = relate(rule, reporter=Reporter(quiet=True))
        affs["lookahead_optimizer"] = rule_affs["lookahead"]
        truth = affs["pairwise"]
        entry = {
            "spearman_vs_pairwise": {k: round(a.spearman(truth), 3) for k, a in affs.items() if k != "pairwise"},
            "within_target_spearman_vs_pairwise": {k: round(within_target_spearman(a, truth), 3)
                                                   for k, a in affs.items() if k != "pairwise"},
            "target_column_share_of_offdiagonal_variance": {
                k: round(column_share(affs[k].matrix), 3) for k in ("lookahead", "lookahead_optimizer", "pairwise")},
            "estimator_own_time_s": {k: round(a.cost.get("wall_time_s", 0.0), 3) for k, a in affs.items()},
            "lookahead_overhead_ratio": affs["lookahead"].cost.get("overhead_ratio"),
            "joint_run_time_s": round(affs["lookahead"].cost.get("joint_run_time_s", 0.0), 2),
            "run_dir": str(run_dir),
        }
        if args.relate_only:
            report[name] = entry
            continue
        _, summary = group(None, resume=str(run_dir), reporter=Reporter(quiet=True))
        planted = summary.get("planted_groups")
        chosen = [set(g) for g in summary["grouping"]["groups"]]
        recovered = None
        if planted:
            multi = [set(g) for g in planted if len(g) > 1]
            recovered = all(sum(p <= c for c in chosen) == 1 for p in multi) and all(
                sum(bool(c & p) for p in multi) == 1 for c in chosen)
        report[name] = {
            **entry,
            "chosen_groups": summary["grouping"]["groups"],
            "planted_groups": planted,
            "planted_recovered": recovered,
            "total_val_loss": {k: [round(v["total_val_loss_mean"], 4), round(v["total_val_loss_std"], 4)]
                               for k, v in summary["strategies"].items()},
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
