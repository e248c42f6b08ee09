"""The "Task relations" part of a report: affinity heatmaps with their cost, agreement between
estimators, and the grouping comparison. Reads affinity_*.json / groups.json; never trains."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np


def has_relations(run_dir: Path) -> bool:
    return any(Path(run_dir).glob("affinity_*.json")) or (Path(run_dir) / "groups.json").exists()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _affinities(run_dir: Path) -> list[Any]:
    from polytask.relations.affinity import AffinityMatrix

    return [AffinityMatrix.load(p) for p in sorted(Path(run_dir).glob("affinity_*.json"))]


def _agreement(affs: list[Any]) -> str:
    """Spearman correlation of every estimator with the pairwise ground truth, where it was run."""
    truth = next((a for a in affs if a.estimator == "pairwise"), None)
    if truth is None or len(affs) < 2:
        return ""
    rows = "".join(f"<tr><td>{escape(a.estimator)}</td><td class='num'>{a.spearman(truth):+.3f}</td></tr>"
                   for a in affs if a is not truth)
    return ("<h3>Agreement with pairwise transfer (the costly ground truth)</h3>"
            f"<table><thead><tr><th>estimator</th><th>Spearman ρ</th></tr></thead><tbody>{rows}</tbody></table>")


def networks_text(groups: list[list[str]], costs: list[float] | None, labels: list[str] | None) -> str:
    """'a+b | c (half-size, 0.5)': each network's tasks, with its label and cost where they are not the default."""
    out = []
    for i, grp in enumerate(groups):
        cost = costs[i] if costs else 1.0
        label = labels[i] if labels else ""
        extra = ", ".join(x for x in (label, f"cost {cost:g}" if cost != 1.0 else "") if x)
        out.append("+".join(grp) + (f" ({extra})" if extra else ""))
    return " | ".join(out)


def _grouping(run_dir: Path) -> str:
    path = Path(run_dir) / "groups.json"
    if not path.exists():
        return ""
    g = json.loads(path.read_text())
    chosen = g["grouping"]
    rows = []
    for name, st in g["strategies"].items():
        groups = networks_text(st["groups"], st.get("costs"), st.get("labels"))
        if st.get("form") == "stg-soft":
            groups = f"{st['models']} models on all tasks, losses weighted by membership; served by their ensemble"
        cost = st.get("total_cost", st["models"])
        rows.append(f"<tr><td>{escape(name)}</td><td class='num'>{st['models']}</td><td class='num'>{cost:g}</td>"
                    f"<td>{escape(groups)}</td>"
                    f"<td class='num'>{st['total_val_loss_mean']:.4f} ± {st['total_val_loss_std']:.4f}</td></tr>")
    tasks = g["tasks"]
    first = next(iter(g["strategies"].values()))["seeds"][0]["tasks"]
    keys = {t: next(k for k in first[t] if k not in ("val_loss", "loss")) for t in tasks}
    metric_rows = []
    for name, st in g["strategies"].items():
        cells = "".join(f"<td class='num'>{np.mean([s['tasks'][t][keys[t]] for s in st['seeds']]):.4f}</td>"
                        for t in tasks)
        metric_rows.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    planted = g.get("planted_groups")
    budget = g["budget"]
    return (
        f"<h3>Grouping (budget {budget:g}, from {escape(g['estimator'])} affinity)</h3>"
        f"<p>chosen: <b>{escape(networks_text(chosen['groups'], chosen.get('costs'), chosen.get('labels')))}</b> "
        f"({escape(chosen['solver'])}, score {chosen['total']:.4g}, "
        f"cost {chosen.get('total_cost', len(chosen['groups'])):g}"
        + (f", STG-MTL {escape(g['stg_form'])} form" if g.get("stg_form") else "") + ")"
        + (f"; planted: {escape(' | '.join('+'.join(x) for x in planted))}" if planted else "") + "</p>"
        "<table><thead><tr><th>strategy</th><th>models</th><th>cost</th><th>networks</th>"
        "<th>total validation loss ↓ (mean ± std over seeds)</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p class='note'>Every task is scored by the model that serves it. Independent uses one model per task "
        "(over budget); random groupings split the tasks into as many groups as the budget buys networks of the "
        "affinity's cost.</p>"
        "<h3>Per-task test metric (mean over seeds)</h3>"
        f"<table><thead><tr><th>strategy</th>{''.join(f'<th>{escape(t)} ({keys[t]})</th>' for t in tasks)}"
        "</tr></thead>"
        f"<tbody>{''.join(metric_rows)}</tbody></table>"
    )


def relations_section(run_dir: Path) -> str:
    """HTML for the relations results in ``run_dir`` ('' if there are none)."""
    if not has_relations(run_dir):
        return ""
    from polytask.relations.heatmap import heatmap_svg

    affs = _affinities(run_dir)
    maps = "".join(
        f"<figure class='chart'>{heatmap_svg(a, title=f'{a.estimator} (row i → column j)')}"
        f"<figcaption>cost: {escape('; '.join(f'{k}: {_fmt(v)}' for k, v in a.cost.items()))}</figcaption>"
        "</figure>" for a in affs)
    return f"<h2>Task relations</h2><div class='charts'>{maps}</div>{_agreement(affs)}{_grouping(run_dir)}"
