"""Results tables from a run's ``summary.json``: one model of the table, rendered by rich and HTML."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

MetricSpec = tuple[str, bool | None]
"""A metric name and whether higher is better (None: direction unknown)."""


def number(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing or not a number (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def task_metrics(summary: Mapping[str, Any]) -> dict[str, list[MetricSpec]]:
    """Each task's metrics in suite order, read from ``suite.tasks``.

    Without a suite, tasks and metric names come from the results (directions unknown, loss lower);
    a task that declares no metric is judged by its loss.
    """
    tasks: dict[str, list[MetricSpec]] = {}
    suite = summary.get("suite")
    declared = suite.get("tasks") if isinstance(suite, Mapping) else None
    for task in declared if isinstance(declared, list) else []:
        if isinstance(task, Mapping) and isinstance(task.get("name"), str):
            specs = []
            for metric in task.get("metrics") or []:
                if isinstance(metric, Mapping) and isinstance(metric.get("name"), str):
                    better = metric.get("higher_is_better")
                    specs.append((metric["name"], better if isinstance(better, bool) else None))
                elif isinstance(metric, str):
                    specs.append((metric, None))
            tasks[task["name"]] = specs or [("loss", False)]
    if tasks:
        return tasks
    for result in _results(summary).values():
        for name, values in (result.get("tasks") or {}).items():
            seen = tasks.setdefault(name, [])
            for metric in values if isinstance(values, Mapping) else {}:
                if metric != "loss" and (metric, None) not in seen:
                    seen.append((metric, None))
    return {name: specs or [("loss", False)] for name, specs in tasks.items()}


def _results(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    results = summary.get("results")
    if not isinstance(results, Mapping):
        return {}
    return {name: r for name, r in results.items() if isinstance(r, Mapping)}


def _format(value: float | None, decimals: int, signed: bool) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    value = round(value, decimals) + 0.0
    if signed and value != 0:
        return f"{value:+.{decimals}f}"
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class Column:
    """One numeric column of the results table: a task metric or a run-level score."""

    group: str
    name: str
    higher_is_better: bool | None
    values: tuple[float | None, ...]
    decimals: int
    signed: bool = False

    @property
    def header(self) -> str:
        """The metric name with an arrow for its direction."""
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return f"{self.name}{arrow}"

    def text(self, row: int) -> str:
        """The cell of method ``row`` as text ('—' when missing)."""
        return _format(self.values[row], self.decimals, self.signed)

    def is_best(self, row: int) -> bool:
        """Whether method ``row`` shows the best value of the column (ties all count)."""
        finite = [v for v in self.values if v is not None and math.isfinite(v)]
        value = self.values[row]
        if self.higher_is_better is None or len(finite) < 2 or value is None:
            return False
        best = max(finite) if self.higher_is_better else min(finite)
        return self.text(row) == _format(best, self.decimals, self.signed)


@dataclass(frozen=True)
class ResultsTable:
    """Methods (rows, display order) and numeric columns of one run's results."""

    methods: tuple[str, ...]
    columns: tuple[Column, ...]
    reference: str | None


def _decimals(values: list[float | None]) -> int:
    largest = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    return 4 if largest < 10 else 2 if largest < 1000 else 0


def tabulate_results(summary: Mapping[str, Any]) -> ResultsTable:
    """The results table of a summary: per-task test metrics, then Δm%, mean rank and wall time.

    Run-level columns that no method reports (e.g. Δm% without a reference) are left out.
    """
    results = _results(summary)
    methods = tuple(results)
    columns: list[Column] = []
    for task, specs in task_metrics(summary).items():
        for metric, better in specs:
            values = []
            for method in methods:
                scores = (results[method].get("tasks") or {}).get(task)
                values.append(number(scores.get(metric)) if isinstance(scores, Mapping) else None)
            columns.append(Column(task, metric, better, tuple(values), _decimals(values)))
    ranks = summary.get("mean_rank")
    ranks = ranks if isinstance(ranks, Mapping) else {}
    run_level = [
        ("Δm%", tuple(number(results[m].get("delta_m")) for m in methods), 2, True),
        ("mean rank", tuple(number(ranks.get(m)) for m in methods), 2, False),
        ("time (s)", tuple(number(results[m].get("wall_time_s")) for m in methods), 1, False),
    ]
    for name, values, decimals, signed in run_level:
        if any(v is not None for v in values):
            columns.append(Column("", name, False, values, decimals, signed))
    reference = summary.get("reference")
    return ResultsTable(methods, tuple(columns), reference if isinstance(reference, str) else None)


def results_table(summary: Mapping[str, Any]) -> Table:
    """A rich table of a run's results: rows are methods, best value per column in bold green."""
    model = tabulate_results(summary)
    suite = summary.get("suite")
    suite_name = suite.get("name") if isinstance(suite, Mapping) else None
    title = " · ".join(str(s) for s in (suite_name, summary.get("run_id")) if s)
    caption = "test metrics at the best-validation epoch"
    if model.reference:
        caption += f" · Δm% vs {model.reference}"
    table = Table(title=title or None, caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("method", no_wrap=True)
    for column in model.columns:
        header = f"{column.group}\n{column.header}" if column.group else column.header
        table.add_column(header, justify="right")
    for row, method in enumerate(model.methods):
        label = f"{method} (ref)" if method == model.reference else method
        cells = [Text(c.text(row), style="bold green" if c.is_best(row) else "") for c in model.columns]
        table.add_row(label, *cells)
    return table


def format_results(summary: Mapping[str, Any]) -> str:
    """The results table as plain text (120 columns, no colour), for logs and tests."""
    console = Console(file=io.StringIO(), record=True, width=120, no_color=True, color_system=None)
    console.print(results_table(summary))
    return console.export_text(styles=False)
