"""The "Pareto front" part of a report: every method of one or more finished runs as a point of per-task test
scores, the non-dominated set, hypervolume, and the tasks where a method is worse than single-task.

Reads ``summary.json`` dicts only; the math is :mod:`polytask.evaluation.pareto`. Choices made here (each stated
in the report's note too):

- one objective per task, its first declared metric (the one the training curves show); a task's other metrics
  stay in the results table;
- with a single-task row (the run's Δm% reference, ``summary["reference"]``), objectives are the signed relative
  change against it, the per-task term of Δm% (so tasks of different units share one hypervolume), else the raw
  scores in minimise form;
- the hypervolume's reference point is the worst shown value of each objective plus 10 % of its range
  (:func:`~polytask.evaluation.pareto.reference_point`); with a single-task row a second hypervolume uses the
  single-task scores as reference point: only methods better than single-task on every task count there;
- "worse than single-task" compares the same primary metric, strictly, with no test of significance.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np

from polytask.errors import DataError
from polytask.evaluation.pareto import (
    contributions,
    hypervolume,
    non_dominated,
    normalise,
    orient,
    reference_point,
    worse_than,
)
from polytask.report.console import number, task_metrics
from polytask.report.svg import PALETTE, scatter_chart, scientific

MAX_PROJECTED_TASKS = 6
"""With more tasks the projection grid shows the first six (15 plots); the table covers every task."""


@dataclass(frozen=True)
class Axes:
    """The tasks of a front: each task's primary metric and whether higher is better."""

    tasks: tuple[str, ...]
    metrics: tuple[str, ...]
    higher_is_better: tuple[bool, ...]


@dataclass(frozen=True)
class Front:
    """Methods as points of per-task scores (rows of ``values``, raw units), their minimise-form ``objectives``
    (relative to ``baseline`` when ``normalised``), the report's reference point and the non-dominated rows."""

    labels: tuple[str, ...]
    axes: Axes
    values: np.ndarray
    objectives: np.ndarray
    normalised: bool
    baseline: str | None
    references: tuple[str, ...]
    ref: np.ndarray
    front: tuple[int, ...]
    colors: Mapping[str, str]
    excluded: Mapping[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks, one objective each."""
        return self.axes.tasks

    @property
    def joint(self) -> list[int]:
        """Rows that are not a single-task reference."""
        return [i for i, label in enumerate(self.labels) if label not in self.references]

    def hypervolume(self, rows: Sequence[int] | None = None, ref: np.ndarray | None = None) -> float:
        """Hypervolume of ``rows`` (default all) against ``ref`` (default the report's reference point)."""
        chosen = self.objectives if rows is None else self.objectives[list(rows)]
        return hypervolume(chosen.reshape(-1, len(self.tasks)), self.ref if ref is None else ref)

    def baseline_point(self) -> np.ndarray | None:
        """The single-task row's objectives, or None without one."""
        return None if self.baseline is None else self.objectives[self.labels.index(self.baseline)]

    def worse(self) -> dict[str, list[tuple[str, float]]]:
        """Per non-reference method: the tasks where it is worse than single-task, with the change in % (positive:
        worse, as in Δm%). Empty without a single-task row."""
        b = self.baseline_point()
        if b is None:
            return {}
        mask = worse_than(self.objectives, b)
        rel = self._relative()
        return {self.labels[i]: [(t, float(rel[i, k])) for k, t in enumerate(self.tasks) if mask[i, k]]
                for i in self.joint}

    def _relative(self) -> np.ndarray:
        """Per-task change against the baseline in %, signed as Δm% (NaN where the baseline scores 0)."""
        if self.normalised:
            return self.objectives * 100.0
        b = self.baseline_point()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b != 0, (self.objectives - b) / np.abs(b) * 100.0, np.nan)


def primary_metrics(summary: Mapping[str, Any], where: str = "the run") -> Axes:
    """Each task's primary (first declared) metric and direction; a metric of unknown direction is an error
    (``loss`` is taken as lower-is-better)."""
    tasks, metrics, better = [], [], []
    for task, specs in task_metrics(summary).items():
        metric, higher = specs[0]
        if higher is None and metric == "loss":
            higher = False
        if higher is None:
            raise DataError(f"{where}: task {task!r} metric {metric!r} has no direction (higher_is_better) in "
                            "summary.json's suite.tasks, so a Pareto front cannot be drawn")
        tasks.append(task)
        metrics.append(metric)
        better.append(bool(higher))
    return Axes(tuple(tasks), tuple(metrics), tuple(better))


def _rows(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    results = summary.get("results")
    return {m: r for m, r in results.items() if isinstance(r, Mapping)} if isinstance(results, Mapping) else {}


def _score(result: Mapping[str, Any], task: str, metric: str) -> float | None:
    scores = (result.get("tasks") or {}).get(task)
    value = number(scores.get(metric)) if isinstance(scores, Mapping) else None
    return value if value is not None and np.isfinite(value) else None


def _reference(summary: Mapping[str, Any]) -> str | None:
    """The run's single-task row: its Δm% reference, where it is one of its results."""
    reference = summary.get("reference")
    return reference if isinstance(reference, str) and reference in _rows(summary) else None


def build_front(runs: Sequence[tuple[str, Mapping[str, Any]]], normalise_by_baseline: bool | None = None) -> Front:
    """The front over every method of ``runs`` (name, summary); labels are ``run/method`` when there are several.

    All runs must have the same tasks with the same primary metric (an error names the run and the task). The
    single-task baseline is the first run's reference row that has one. ``normalise_by_baseline``: None
    normalises when a usable baseline exists, True requires one, False keeps raw scores."""
    if not runs:
        raise DataError("a Pareto front needs at least one run")
    first_name, first = runs[0]
    objs = primary_metrics(first, f"run {first_name!r}")
    for name, summary in runs[1:]:
        _same_tasks(objs, primary_metrics(summary, f"run {name!r}"), first_name, name)
    several = len(runs) > 1
    labels, values, references, excluded = [], [], [], {}
    order: list[str] = []
    for name, summary in runs:
        ref_row = _reference(summary)
        for method, result in _rows(summary).items():
            label = f"{name}/{method}" if several else method
            order.append(label)
            scores = [_score(result, t, m) for t, m in zip(objs.tasks, objs.metrics, strict=True)]
            missing = [t for t, s in zip(objs.tasks, scores, strict=True) if s is None]
            if missing:
                excluded[label] = f"no finite test score for task(s) {', '.join(missing)}"
                continue
            labels.append(label)
            values.append(scores)
            if method == ref_row:
                references.append(label)
    if not labels:
        raise DataError(f"no method of {', '.join(repr(n) for n, _ in runs)} has a finite test score on every task "
                        f"({', '.join(objs.tasks)}): {'; '.join(f'{k}: {v}' for k, v in excluded.items())}")
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(order)}
    v = np.asarray(values, dtype=np.float64).reshape(-1, len(objs.tasks))
    baseline = references[0] if references else None
    usable = baseline is not None and bool(np.all(v[labels.index(baseline)] != 0))
    if normalise_by_baseline and not usable:
        why = "no run has a single-task row" if baseline is None else f"{baseline} has a score of 0"
        raise DataError(f"cannot normalise by the single-task scores: {why}")
    normalised = usable if normalise_by_baseline is None else bool(normalise_by_baseline)
    if normalised:
        obj = normalise(v, v[labels.index(baseline)], objs.higher_is_better)
    else:
        obj = orient(v, objs.higher_is_better)
    ref = reference_point(obj)
    return Front(tuple(labels), objs, v, obj, normalised, baseline, tuple(references), ref,
                 tuple(non_dominated(obj)), colors, excluded)


def _same_tasks(a: Axes, b: Axes, name_a: str, name_b: str) -> None:
    for task in a.tasks:
        if task not in b.tasks:
            raise DataError(f"run {name_b!r} has no task {task!r} (run {name_a!r} has {', '.join(a.tasks)}); "
                            "a front needs the same tasks in every run")
    for task in b.tasks:
        if task not in a.tasks:
            raise DataError(f"run {name_a!r} has no task {task!r} (run {name_b!r} has {', '.join(b.tasks)}); "
                            "a front needs the same tasks in every run")
    for task, metric in zip(b.tasks, b.metrics, strict=True):
        expected = a.metrics[a.tasks.index(task)]
        if metric != expected:
            raise DataError(f"run {name_b!r}: task {task!r} is scored by {metric!r}, run {name_a!r} by {expected!r}; "
                            "a front compares one metric per task")


def has_front(summary: Mapping[str, Any]) -> bool:
    """Whether a run's report shows a Pareto section: >= 2 tasks and >= 2 methods besides the single-task row."""
    rows = _rows(summary)
    return len(task_metrics(summary)) >= 2 and len([m for m in rows if m != _reference(summary)]) >= 2


def front_summary(front: Front) -> dict[str, Any]:
    """The front as JSON-ready data: points, non-dominated methods, hypervolumes and their reference points."""
    objs = front.axes
    b = front.baseline_point()
    out: dict[str, Any] = {
        "tasks": list(objs.tasks),
        "metrics": dict(zip(objs.tasks, objs.metrics, strict=True)),
        "higher_is_better": dict(zip(objs.tasks, objs.higher_is_better, strict=True)),
        "points": {label: dict(zip(objs.tasks, map(float, row), strict=True))
                   for label, row in zip(front.labels, front.values, strict=True)},
        "single_task": front.baseline,
        "objectives": "relative change vs single-task (minimise)" if front.normalised else "scores (minimise form)",
        "non_dominated": [front.labels[i] for i in front.front],
        "reference_point": [float(x) for x in front.ref],
        "reference_rule": "worst shown value per task + 10% of its range",
        "hypervolume": front.hypervolume(),
    }
    if b is not None:
        out["hypervolume_joint"] = front.hypervolume(front.joint)
        out["hypervolume_above_single_task"] = front.hypervolume(None, b)
        out["worse_than_single_task"] = {m: [t for t, _ in tasks] for m, tasks in front.worse().items()}
    if front.excluded:
        out["excluded"] = dict(front.excluded)
    return out


def _axis(objs: Axes, k: int) -> str:
    return f"{objs.tasks[k]} {objs.metrics[k]} {'↑' if objs.higher_is_better[k] else '↓'}"


def front_charts(front: Front) -> list[str]:
    """The SVG plots: for two tasks one scatter with the staircase; for more, pairwise projections (first
    :data:`MAX_PROJECTED_TASKS` tasks) with the non-dominated set of the full space filled."""
    objs = front.axes
    on_front = [front.labels[i] for i in front.front]
    k = min(len(objs.tasks), MAX_PROJECTED_TASKS)
    pairs = list(itertools.combinations(range(k), 2))
    two = len(objs.tasks) == 2
    charts = []
    for a, b in pairs:
        points = {label: (float(row[a]), float(row[b])) for label, row in zip(front.labels, front.values,
                                                                               strict=True)}
        title = (f"Pareto front · {objs.tasks[a]} vs {objs.tasks[b]}" if two
                 else f"{objs.tasks[a]} vs {objs.tasks[b]} (projection)")
        charts.append(scatter_chart(points, title, _axis(objs, a), _axis(objs, b),
                                    better=(objs.higher_is_better[a], objs.higher_is_better[b]), front=on_front,
                                    staircase=two, squares=front.references, colors=front.colors,
                                    width=540 if two else 520, height=360 if two else 320))
    return charts


def _hv(value: float) -> str:
    """A hypervolume with four significant digits (scientific where that reads better)."""
    return "0" if value == 0 else scientific(value, 4) if abs(value) >= 1e6 or abs(value) < 1e-3 else f"{value:.4g}"


def _hv_table(front: Front) -> str:
    b = front.baseline_point()
    heads = ["method set", "methods", "hypervolume ↑"] + (["hypervolume above single-task ↑"] if b is not None
                                                          else [])
    sets = [("all methods", list(range(len(front.labels)))), ("non-dominated", list(front.front))]
    if b is not None:
        sets.append(("joint methods (no single-task)", front.joint))
    rows = []
    for name, idx in sets:
        cells = [name, ", ".join(front.labels[i] for i in idx) or "—", _hv(front.hypervolume(idx))]
        if b is not None:
            cells.append(_hv(front.hypervolume(idx, b)))
        rows.append("<tr>" + "".join(f"<td class='label'>{escape(c)}</td>" if j < 2 else f"<td>{escape(c)}</td>"
                                     for j, c in enumerate(cells)) + "</tr>")
    head = "".join(f"<th class='label'>{escape(h)}</th>" if j < 2 else f"<th>{escape(h)}</th>"
                   for j, h in enumerate(heads))
    return (f"<div class='scroll'><table class='results pareto-sets'><caption>hypervolume per method set</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _method_table(front: Front) -> str:
    b = front.baseline_point()
    worse = front.worse()
    contrib = contributions(front.objectives, front.ref) if len(front.labels) else np.zeros(0)
    heads = ["method", "non-dominated", "hypervolume alone ↑", "exclusive share ↑"]
    heads += ["worse than single-task on"] if b is not None else []
    rows = []
    members = set(front.front)
    for i, label in enumerate(front.labels):
        cells = [(label, "label"), ("yes" if i in members else "no", "label"),
                 (_hv(front.hypervolume([i])), ""), (_hv(float(contrib[i])), "")]
        if b is not None:
            if label in front.references:
                mark = "(reference)" if label == front.baseline else "(single-task)"
            else:
                mark = ", ".join(t if np.isnan(d) else f"{t} ({d:+.1f}%)" for t, d in worse[label]) or "none"
            cells.append((mark, "label worse" if worse.get(label) else "label"))
        rows.append("<tr>" + "".join(
            f"<td class='{c}'>{escape(t)}</td>" if c else f"<td>{escape(t)}</td>" for t, c in cells) + "</tr>")
    head = "".join(f"<th class='label'>{escape(h)}</th>" if j < 2 or h.startswith("worse") else
                   f"<th>{escape(h)}</th>" for j, h in enumerate(heads))
    return (f"<div class='scroll'><table class='results pareto-methods'><caption>per method</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def pareto_section(front: Front, heading: str = "h2") -> str:
    """The HTML of a front: how to read it, the plots, hypervolume per method set and per method (with the tasks
    where each method is worse than single-task)."""
    objs = front.axes
    space = ("the relative change of each task's primary metric against <b>" + escape(str(front.baseline))
             + "</b> (the per-task term of Δm%)" if front.normalised else "each task's primary metric (raw units)")
    metrics = ", ".join(f"{escape(t)}: {escape(m)}" for t, m in zip(objs.tasks, objs.metrics, strict=True))
    ref = ", ".join(f"{x:.4g}" for x in front.ref)
    how = (f"<p class='note'><b>How to read this.</b> Each point is a method's test score on every task ({metrics}). "
           "Filled markers are non-dominated: no other method is at least as good on every task and better on "
           "one; hollow markers are dominated" + ("; the square is the single-task reference" if front.references
                                                  else "")
           + (". The dashed staircase bounds the region the front dominates" if len(objs.tasks) == 2 else
              ". Plots are pairwise projections; a point can be non-dominated in the full space and look "
              "dominated in one projection")
           + f". Hypervolume is the volume of objective space the methods dominate, measured on {space}, up to a "
           f"reference point of the worst shown value of each task plus 10% of its range ({ref}, minimise form); "
           "larger is better and values compare only within this table. A dominated method adds nothing, so all "
           "methods and the non-dominated ones have the same hypervolume.")
    if front.baseline is not None:
        how += (" <i>Hypervolume above single-task</i> takes the single-task scores as reference point: only "
                "methods better than single-task on every task count. <i>Worse than single-task on</i> lists the "
                "tasks where a method's primary metric is worse than single-task's (change in %, positive is "
                "worse, as in Δm%; no significance test).")
    how += "</p>"
    notes = "".join(f"<p class='note'>{escape(label)} is left out: {escape(why)}.</p>"
                    for label, why in front.excluded.items())
    if len(objs.tasks) > MAX_PROJECTED_TASKS:
        notes += (f"<p class='note'>Projections show the first {MAX_PROJECTED_TASKS} of {len(objs.tasks)} tasks; "
                  "the non-dominated set and hypervolume use all of them.</p>")
    figures = "".join(f"<figure>{svg}</figure>" for svg in front_charts(front))
    return (f"<{heading}>Pareto front</{heading}>{how}{notes}<div class='charts'>{figures}</div>"
            f"{_hv_table(front)}{_method_table(front)}")
