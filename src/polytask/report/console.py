"""Results tables from a run's ``summary.json``: one model of the table, laid out to fit a width, rendered by
rich and HTML.

Layout: one table of methods (rows) × summary columns (Δm%, mean rank, time) then per-task metrics when it fits
the width; otherwise a summary table of methods followed by the per-task metrics transposed (rows: task and
metric, columns: methods), split into several tables of methods when even that is too wide. Numbers are shown
with significant digits, so 6e6 and 1e-4 both read right.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from polytask.report.svg import scientific

MetricSpec = tuple[str, bool | None]
"""A metric name and whether higher is better (None: direction unknown)."""

METRIC_DIGITS = 4
"""Significant digits of task metrics (of the largest value of a column)."""
SUMMARY_DIGITS = 3
"""Significant digits of Δm%, mean rank and time."""


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


def column_decimals(values: Sequence[float | None], digits: int = METRIC_DIGITS) -> int | None:
    """Decimals that give the column's largest magnitude ``digits`` significant digits, or None (scientific)
    when that magnitude is at least 1e6 or below 1e-3, where fixed decimals would be too long or all zeros."""
    largest = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    if largest == 0:
        return digits - 1
    if largest >= 1e6 or largest < 1e-3:
        return None
    return max(0, digits - 1 - math.floor(math.log10(largest)))


def format_number(value: float | None, decimals: int | None, *, digits: int = METRIC_DIGITS,
                  signed: bool = False) -> str:
    """One table cell: ``decimals`` fixed decimals (a column's, see :func:`column_decimals`) or, when None or
    when the value would round to zero there, ``digits`` significant digits in scientific form; '—' if missing."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0" if decimals is None else f"{0:.{decimals}f}"
    sign = "+" if signed and value > 0 else ""
    if decimals is None or round(value, decimals) == 0:
        return sign + scientific(value, digits)
    return f"{sign}{value:.{decimals}f}"


@dataclass(frozen=True)
class Column:
    """One numeric column of the results table: a task metric or a run-level score."""

    group: str
    name: str
    higher_is_better: bool | None
    values: tuple[float | None, ...]
    digits: int = METRIC_DIGITS
    signed: bool = False

    @property
    def header(self) -> str:
        """The metric name with an arrow for its direction."""
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return f"{self.name}{arrow}"

    @property
    def decimals(self) -> int | None:
        """The column's fixed decimals (None: scientific), from its largest value."""
        return column_decimals(self.values, self.digits)

    def _text(self, value: float | None) -> str:
        return format_number(value, self.decimals, digits=self.digits, signed=self.signed)

    def text(self, row: int) -> str:
        """The cell of method ``row`` as text ('—' when missing)."""
        return self._text(self.values[row])

    def is_best(self, row: int) -> bool:
        """Whether method ``row`` shows the best value of the column (ties all count)."""
        finite = [v for v in self.values if v is not None and math.isfinite(v)]
        value = self.values[row]
        if self.higher_is_better is None or len(finite) < 2 or value is None:
            return False
        best = max(finite) if self.higher_is_better else min(finite)
        return self.text(row) == self._text(best)


@dataclass(frozen=True)
class ResultsTable:
    """Methods (rows, display order) and numeric columns of one run's results: summary columns first."""

    methods: tuple[str, ...]
    columns: tuple[Column, ...]
    reference: str | None

    def label(self, method: str) -> str:
        """A method's name as shown, marked when it is the Δm% reference."""
        return f"{method} (ref)" if method == self.reference else method


def tabulate_results(summary: Mapping[str, Any]) -> ResultsTable:
    """The results table of a summary: Δm%, mean rank and wall time, then per-task test metrics.

    Run-level columns that no method reports (e.g. Δm% without a reference) are left out.
    """
    results = _results(summary)
    methods = tuple(results)
    columns: list[Column] = []
    ranks = summary.get("mean_rank")
    ranks = ranks if isinstance(ranks, Mapping) else {}
    run_level = [
        ("Δm%", tuple(number(results[m].get("delta_m")) for m in methods), True),
        ("mean rank", tuple(number(ranks.get(m)) for m in methods), False),
        ("time (s)", tuple(number(results[m].get("wall_time_s")) for m in methods), False),
    ]
    for name, values, signed in run_level:
        if any(v is not None for v in values):
            columns.append(Column("", name, False, values, SUMMARY_DIGITS, signed))
    for task, specs in task_metrics(summary).items():
        for metric, better in specs:
            values = []
            for method in methods:
                scores = (results[method].get("tasks") or {}).get(task)
                values.append(number(scores.get(metric)) if isinstance(scores, Mapping) else None)
            columns.append(Column(task, metric, better, tuple(values)))
    reference = summary.get("reference")
    return ResultsTable(methods, tuple(columns), reference if isinstance(reference, str) else None)


@dataclass(frozen=True)
class Row:
    """One row of a laid-out table: label cells, then value cells and whether each is its column's (or, in a
    transposed table, its row's) best."""

    labels: tuple[str, ...]
    cells: tuple[str, ...]
    best: tuple[bool, ...]


@dataclass(frozen=True)
class Grid:
    """One table of a layout, all text: label columns, value columns (a group line such as the task, and a
    name line), rows."""

    title: str
    label_headers: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    rows: tuple[Row, ...]

    def widths(self) -> list[int]:
        """Characters of each column (label columns, then value columns): its longest header line or cell."""
        labels = [max([len(h), *(len(r.labels[i]) for r in self.rows)]) for i, h in enumerate(self.label_headers)]
        values = [max([len(g), len(h), *(len(r.cells[i]) for r in self.rows)])
                  for i, (g, h) in enumerate(self.headers)]
        return labels + values

    def columns(self, keep: Sequence[int], title: str) -> Grid:
        """The same table with only the value columns ``keep``."""
        rows = tuple(Row(r.labels, tuple(r.cells[i] for i in keep), tuple(r.best[i] for i in keep))
                     for r in self.rows)
        return Grid(title, self.label_headers, tuple(self.headers[i] for i in keep), rows)


def _by_method(model: ResultsTable, columns: Sequence[Column], title: str) -> Grid:
    """Methods as rows, ``columns`` as columns."""
    rows = tuple(Row((model.label(m),), tuple(c.text(i) for c in columns), tuple(c.is_best(i) for c in columns))
                 for i, m in enumerate(model.methods))
    return Grid(title, ("method",), tuple((c.group, c.header) for c in columns), rows)


def _by_metric(model: ResultsTable, columns: Sequence[Column], title: str) -> Grid:
    """Transposed: one row per task metric (task, metric), methods as columns; best value per row."""
    rows = []
    for k, c in enumerate(columns):
        task = c.group if k == 0 or columns[k - 1].group != c.group else ""
        rows.append(Row((task, c.header), tuple(c.text(i) for i in range(len(model.methods))),
                        tuple(c.is_best(i) for i in range(len(model.methods)))))
    return Grid(title, ("task", "metric"), tuple(("", model.label(m)) for m in model.methods), tuple(rows))


def _split(grid: Grid, fits: Callable[[Grid], bool], noun: str) -> list[Grid]:
    """``grid`` cut into the fewest even runs of consecutive value columns that each fit (a run of one column
    is kept even when it does not)."""
    n = len(grid.headers)
    for parts in range(1, n + 1):
        size = math.ceil(n / parts)
        chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        if parts == n or all(fits(grid.columns(c, grid.title)) for c in chunks):
            break
    if len(chunks) == 1:
        return [grid]
    return [grid.columns(c, f"{grid.title} ({noun} {c[0] + 1}-{c[-1] + 1} of {n})") for c in chunks]


def layout(model: ResultsTable, fits: Callable[[Grid], bool]) -> list[Grid]:
    """The tables that show ``model`` within a width (``fits`` says whether a table does).

    One table with the summary columns first when it fits; else a summary table, then the per-task metrics
    transposed (task metrics as rows, methods as columns), split by methods where it is still too wide.
    """
    whole = _by_method(model, model.columns, "results")
    if fits(whole):
        return [whole]
    summary = [c for c in model.columns if not c.group]
    per_task = [c for c in model.columns if c.group]
    grids = [_by_method(model, summary, "summary")] if summary else []
    if per_task:
        grids += _split(_by_metric(model, per_task, "per-task test metrics"), fits, "methods")
    return grids


def rich_table(grid: Grid) -> Table:
    """A rich table of one laid-out grid; the best values in bold green."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for header in grid.label_headers:
        table.add_column(header, no_wrap=True)
    for group, name in grid.headers:
        table.add_column(f"{group}\n{name}" if group else name, justify="right", no_wrap=True)
    for row in grid.rows:
        cells = [Text(c, style="bold green" if b else "") for c, b in zip(row.cells, row.best, strict=True)]
        table.add_row(*row.labels, *cells)
    return table


def _console(width: int) -> Console:
    return Console(file=io.StringIO(), record=True, width=width, no_color=True, color_system=None)


def fits_console(console: Console) -> Callable[[Grid], bool]:
    """Whether a grid rendered by rich fits the console's width without wrapping or cutting a cell."""
    unbounded = console.options.update_width(1 << 20)

    def fits(grid: Grid) -> bool:
        return Measurement.get(console, unbounded, rich_table(grid)).maximum <= console.width

    return fits


def results_tables(summary: Mapping[str, Any], width: int = 120) -> list[tuple[str, Table]]:
    """The titled rich tables of a run's results laid out for ``width`` columns (see :func:`layout`)."""
    model = tabulate_results(summary)
    grids = layout(model, fits_console(_console(width)))
    suite = summary.get("suite")
    suite_name = suite.get("name") if isinstance(suite, Mapping) else None
    run = " · ".join(str(s) for s in (suite_name, summary.get("run_id")) if s)
    return [(" · ".join(s for s in (run, grid.title) if s), rich_table(grid)) for grid in grids]


def caption(summary: Mapping[str, Any]) -> str:
    """What the numbers are: test metrics at the best-validation epoch, and the Δm% reference."""
    reference = summary.get("reference")
    text = "test metrics at the best-validation epoch"
    return text + (f" · Δm% vs {reference}" if isinstance(reference, str) else "")


def format_results(summary: Mapping[str, Any], width: int = 120) -> str:
    """The results tables as plain text (``width`` columns, no colour), for the terminal, logs and tests."""
    console = _console(width)
    for title, table in results_tables(summary, width):
        console.print(title, style="bold")
        console.print(table)
    console.print(caption(summary), style="italic")
    return console.export_text(styles=False)
