"""The report's part for methods that train a whole front in one run (PaMaL, :mod:`polytask.models.pareto`): a job
whose ``result.json`` holds ``front`` (its test scores at a grid of weightings alpha) is drawn as a curve through
the grid for 2 tasks, and as a cloud in pairwise projections for 3 or more, beside every other method's point of
the run, with hypervolumes.

Reads the run directory's files only; the math is :mod:`polytask.evaluation.pareto`. Choices made here (stated in
the report's note too): one objective per task, its first declared metric (as the run's Pareto section); with a
single-task row the objectives are the relative change against it (the per-task term of Δm%), else the scores in
minimise form; the reference point is the worst shown value of each objective (front and methods together) plus
10 % of its range, so the hypervolumes of one table compare.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from polytask.evaluation.pareto import hypervolume, normalise, orient, reference_point
from polytask.report.console import number, task_metrics
from polytask.report.svg import PALETTE, format_tick, nice_ticks

Point = tuple[float, float]
MAX_PROJECTED = 4
"""Projections drawn for at most this many tasks (6 plots); the hypervolume uses every task."""


def job_fronts(run_dir: Path) -> dict[str, Mapping[str, Any]]:
    """The finished jobs of ``run_dir`` whose result holds a ``front``, by job id (unreadable results skipped)."""
    out: dict[str, Mapping[str, Any]] = {}
    for path in sorted(Path(run_dir).glob("jobs/*/result.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, Mapping) and isinstance(result.get("front"), list) and result["front"]:
            out[str(result.get("job", path.parent.name))] = result
    return out


def _axes(summary: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(task, primary metric, higher is better) per task; a metric of unknown direction is taken as a loss."""
    return [(t, specs[0][0], bool(specs[0][1])) for t, specs in task_metrics(summary).items()]


def _scores(scores: Any, axes: Sequence[tuple[str, str, bool]]) -> list[float] | None:
    """One row of primary test scores, or None when a task lacks a finite one."""
    row = []
    for task, metric, _ in axes:
        s = scores.get(task) if isinstance(scores, Mapping) else None
        v = number(s.get(metric)) if isinstance(s, Mapping) else None
        if v is None or not math.isfinite(v):
            return None
        row.append(v)
    return row


def front_data(result: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """A front job against the run's other methods, as data: the grid's weightings and scores, the other methods'
    scores, the job's reported scores (its ``test``: the centre weighting, which the 3-task grid lacks), the
    objectives (minimise form, relative to single-task where the run has it), the reference point over all of
    them and hypervolumes (the whole front, its reported centre, every other method together and each alone)."""
    axes = _axes(summary)
    job = str(result.get("job", ""))
    grid = [(list(map(float, e.get("alpha", []))), _scores(e.get("test"), axes)) for e in result["front"]]
    grid = [(a, s) for a, s in grid if s is not None]
    results = summary.get("results") if isinstance(summary.get("results"), Mapping) else {}
    reference = summary.get("reference") if summary.get("reference") in results else None
    others = {m: s for m, r in results.items() if m != job and isinstance(r, Mapping)
              and (s := _scores(r.get("tasks"), axes)) is not None}
    higher = [h for _, _, h in axes]
    centre = _scores(result.get("test"), axes)  # what the run reports: the network at the simplex's centre
    if centre is None and (i := _centre(grid)) is not None:
        centre = grid[i][1]
    values = np.asarray([s for _, s in grid] + list(others.values()) + ([centre] if centre else []),
                        dtype=np.float64).reshape(-1, len(axes))
    base = np.asarray(others[reference]) if reference in others else None
    relative = base is not None and bool(np.all(base != 0))
    obj = normalise(values, base, higher) if relative else orient(values, higher)
    n, m = len(grid), len(others)
    ref = reference_point(obj)
    out: dict[str, Any] = {
        "job": job, "tasks": [t for t, _, _ in axes], "metrics": [m for _, m, _ in axes], "higher_is_better": higher,
        "alphas": [a for a, _ in grid], "scores": [s for _, s in grid], "others": others, "centre": centre,
        "objectives": "relative change vs single-task (minimise)" if relative else "scores (minimise form)",
        "reference_point": [float(x) for x in ref],
        "hypervolume": {f"{job} front ({n} weightings)": hypervolume(obj[:n], ref)},
    }
    if centre is not None:
        out["hypervolume"][f"{job} at the centre (reported)"] = hypervolume(obj[n + m:], ref)
    if others:
        out["hypervolume"]["every other method"] = hypervolume(obj[n:n + m], ref)
        for i, name in enumerate(others):
            out["hypervolume"][name] = hypervolume(obj[n + i:n + i + 1], ref)
    return out


def _centre(grid: Sequence[tuple[list[float], list[float]]]) -> int | None:
    """The index of the grid's centre weighting (1/K each), None when the grid lacks it."""
    for i, (a, _) in enumerate(grid):
        if a and all(abs(x - 1 / len(a)) < 1e-6 for x in a):
            return i
    return None


def _num(v: float) -> str:
    return f"{v:.1f}"


def front_chart(curve: Sequence[Point], points: Mapping[str, Point], title: str, xlabel: str, ylabel: str, *,
                line: bool, ends: Mapping[str, Point] | None = None, color: str = PALETTE[0],
                width: int = 540, height: int = 360) -> str:
    """An inline ``<svg>``: the front's ``curve`` (joined in order when ``line``, else a cloud of dots), its
    ``ends`` labelled (the anchors), and ``points`` (other methods, the centre) as labelled rings."""
    xs = [p[0] for p in curve] + [p[0] for p in points.values()]
    ys = [p[1] for p in curve] + [p[1] for p in points.values()]
    xt, yt = nice_ticks(min(xs), max(xs), 5), nice_ticks(min(ys), max(ys), 5)
    ylabels = [format_tick(t, yt) for t in yt]
    top, bottom, right = 34.0, 44.0, 24.0
    left = max(58.0, 34 + 6.6 * max(len(s) for s in ylabels))
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    base = top + ph
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" font-family="system-ui, sans-serif" font-size="11" fill="#1f2328">',
             f"<title>{escape(title)}</title>",
             f'<text x="{_num(left)}" y="20" font-size="13" font-weight="600">{escape(title)}</text>']
    for t, label in zip(yt, ylabels, strict=True):
        parts.append(f'<line x1="{_num(left)}" x2="{_num(left + pw)}" y1="{_num(py(t))}" y2="{_num(py(t))}" '
                     'stroke="#e6e9ed"/>'
                     f'<text x="{_num(left - 6)}" y="{_num(py(t) + 3.5)}" text-anchor="end" fill="#59636e">'
                     f"{escape(label)}</text>")
    for t in xt:
        parts.append(f'<line x1="{_num(px(t))}" x2="{_num(px(t))}" y1="{base}" y2="{base + 4}" stroke="#8c959f"/>'
                     f'<text x="{_num(px(t))}" y="{base + 16}" text-anchor="middle" fill="#59636e">'
                     f"{escape(format_tick(t, xt))}</text>")
    cy = _num(top + ph / 2)
    parts.append(f'<path d="M{_num(left)} {top}V{base}H{_num(left + pw)}" fill="none" stroke="#8c959f"/>'
                 f'<text x="{_num(left + pw / 2)}" y="{height - 8}" text-anchor="middle" fill="#59636e">'
                 f"{escape(xlabel)}</text>"
                 f'<text x="14" y="{cy}" transform="rotate(-90 14 {cy})" text-anchor="middle" fill="#59636e">'
                 f"{escape(ylabel)}</text>")
    if line and len(curve) > 1:
        coords = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in curve)
        parts.append(f'<polyline data-front="curve" points="{coords}" fill="none" stroke="{color}" '
                     'stroke-width="2" stroke-linejoin="round"/>')
    for x, y in curve:
        parts.append(f'<circle data-front="point" cx="{_num(px(x))}" cy="{_num(py(y))}" r="{2.5 if line else 2}" '
                     f'fill="{color}" fill-opacity="{1 if line else 0.55}"/>')
    labelled = [(name, p, color, "end-label") for name, p in (ends or {}).items()]
    labelled += [(name, p, PALETTE[(i + 1) % len(PALETTE)], "method") for i, (name, p) in enumerate(points.items())]
    for name, (x, y), c, kind in labelled:
        if kind == "method":
            parts.append(f'<circle data-label="{escape(name)}" cx="{_num(px(x))}" cy="{_num(py(y))}" r="5.5" '
                         f'fill="none" stroke="{c}" stroke-width="2"><title>{escape(f"{name}: ({x:.4g}, {y:.4g})")}'
                         "</title></circle>")
        anchor = "end" if px(x) > left + 0.75 * pw else "start"
        dx = -8 if anchor == "end" else 8
        parts.append(f'<text x="{_num(px(x) + dx)}" y="{_num(py(y) - 7)}" text-anchor="{anchor}" fill="{c}">'
                     f"{escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _axis(task: str, metric: str, higher: bool) -> str:
    return f"{task} {metric} {'↑' if higher else '↓'}"


def front_charts(data: Mapping[str, Any]) -> list[str]:
    """The plots of one front: 2 tasks, the curve through the grid (anchor ends labelled); 3 or more, the grid as
    a cloud in each pairwise projection (first :data:`MAX_PROJECTED` tasks), the anchors labelled; every other
    method and the front's centre as labelled rings. Test scores, raw units."""
    tasks, metrics, higher = data["tasks"], data["metrics"], data["higher_is_better"]
    alphas, scores = data["alphas"], data["scores"]
    job, centre = data["job"], data["centre"]
    charts = []
    for a, b in itertools.combinations(range(min(len(tasks), MAX_PROJECTED)), 2):
        curve = [(s[a], s[b]) for s in scores]
        ends = {f"anchor {tasks[k]}": (scores[i][a], scores[i][b])
                for k in range(len(tasks)) for i, al in enumerate(alphas) if al and al[k] == 1.0}
        points = {m: (s[a], s[b]) for m, s in data["others"].items()}
        if centre is not None:
            points[f"{job} (centre)"] = (centre[a], centre[b])
        title = (f"{job} front · {tasks[a]} vs {tasks[b]}" if len(tasks) == 2
                 else f"{job} front · {tasks[a]} vs {tasks[b]} (projection)")
        charts.append(front_chart(curve, points, title, _axis(tasks[a], metrics[a], higher[a]),
                                  _axis(tasks[b], metrics[b], higher[b]), line=len(tasks) == 2, ends=ends))
    return charts


def _hv(v: float) -> str:
    return "0" if v == 0 else f"{v:.4g}"


def front_section(run_dir: Path, summary: Mapping[str, Any]) -> str:
    """The HTML of every front job of ``run_dir`` (empty when none has one): how to read it, the plots and the
    hypervolume table."""
    html = []
    for result in job_fronts(run_dir).values():
        if len(_axes(summary)) < 2:
            continue
        data = front_data(result, summary)
        if len(data["scores"]) < 2:
            continue
        job = escape(data["job"])
        space = ("the relative change of each task's primary metric against the single-task row (the per-task term "
                 "of Δm%)" if data["objectives"].startswith("relative") else "each task's primary metric")
        note = (f"<p class='note'><b>{job}</b> trained one network per task (its anchors) and every weighting alpha "
                f"of them in one run; each dot is the network at one alpha of a grid ({len(data['scores'])} "
                "weightings), scored on the test split"
                + (", joined in order from one anchor to the other" if len(data["tasks"]) == 2 else
                   "; plots are pairwise projections")
                + f". Rings are the run's other methods and {job} at the centre alpha (1/K each), the point its "
                f"row in the results reports. Hypervolume is measured on {space}, up to a reference point of the "
                "worst shown value of each task plus 10% of its range; larger is better, and values compare only "
                "within this table.</p>")
        rows = "".join(f"<tr><td class='label'>{escape(k)}</td><td>{_hv(v)}</td></tr>"
                       for k, v in data["hypervolume"].items())
        table = ("<div class='scroll'><table class='results pamal-front'><caption>hypervolume</caption><thead><tr>"
                 "<th class='label'>points</th><th>hypervolume ↑</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table></div>")
        figures = "".join(f"<figure>{svg}</figure>" for svg in front_charts(data))
        html.append(f"<h2>Front of {job}</h2>{note}<div class='charts'>{figures}</div>{table}")
    return "".join(html)
