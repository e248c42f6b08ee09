"""The report of a merging experiment (``summary.json`` of :mod:`polytask.flows.merge`): console text and one
self-contained HTML page (no scripts, no URLs).

The results are laid out by the report's table engine (:func:`polytask.report.console.layout`): the summary
columns (mean normalised score, mean score, merge time) first, in one table with the per-task columns when it
fits the width, else a summary table followed by the per-task scores transposed (tasks as rows, methods as
columns) and split by methods until each table fits. Numbers carry significant digits. The best merged value
of each column is marked; the reference rows (the fine-tuned models, the pretrained backbone) are not
candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from polytask.report.console import (
    SUMMARY_DIGITS,
    Column,
    ResultsTable,
    fits_console,
    layout,
    number,
    rich_table,
)
from polytask.report.console import _console as console_of
from polytask.report.html import _CSS as REPORT_CSS
from polytask.report.html import _tables as html_tables
from polytask.report.html import fits_page

REFERENCE_ROWS = ("finetuned", "pretrained")


@dataclass(frozen=True)
class MergeColumn(Column):
    """A results column whose best value is looked for among the merged methods only."""

    candidates: tuple[bool, ...] = ()

    def is_best(self, row: int) -> bool:
        if self.candidates and not self.candidates[row]:
            return False
        merged = tuple(v if c else None for v, c in zip(self.values, self.candidates, strict=True))
        return Column(self.group, self.name, self.higher_is_better, merged, self.digits).is_best(row)


def merge_results(summary: Mapping[str, Any]) -> ResultsTable:
    """The experiment's results as a table model: per method, the mean normalised score, the mean score and
    the merge time, then per task its metric and its normalised score."""
    results = summary["results"]
    methods = tuple(results)
    merged = tuple(m not in REFERENCE_ROWS for m in methods)

    def col(group: str, name: str, better: bool | None, values: Sequence[Any], digits: int = 4) -> MergeColumn:
        return MergeColumn(group, name, better, tuple(number(v) for v in values), digits, candidates=merged)

    rows = [results[m] for m in methods]
    columns = [col("", "mean norm.", True, [r.get("mean_normalized") for r in rows], SUMMARY_DIGITS),
               col("", "mean", True, [r.get("mean") for r in rows], SUMMARY_DIGITS),
               col("", "time (s)", None, [r.get("seconds") for r in rows], SUMMARY_DIGITS)]
    for t in summary["tasks"]:
        name, metric = t["name"], t["metric"]
        columns.append(col(name, metric, t.get("higher_is_better", True),
                           [(r.get("tasks", {}).get(name) or {}).get(metric) for r in rows]))
        columns.append(col(name, "norm.", True, [(r.get("normalized") or {}).get(name) for r in rows]))
    return ResultsTable(methods, tuple(columns), "finetuned" if "finetuned" in results else None)


def table_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the whole table as numbers (for scripts): method, then every column of
    :func:`merge_results`."""
    model = merge_results(summary)
    head = ["method", *[f"{c.group} {c.name}" if c.group else c.name for c in model.columns]]
    return head, [[m, *[c.values[i] for c in model.columns]] for i, m in enumerate(model.methods)]


def format_merge_table(summary: Mapping[str, Any], width: int = 120) -> str:
    """The experiment's tables as plain text laid out for ``width`` columns."""
    console = console_of(width)
    for grid in layout(merge_results(summary), fits_console(console)):
        console.print(grid.title, style="bold")
        console.print(rich_table(grid))
    return console.export_text(styles=False)


def render_merge_report(summary: Mapping[str, Any]) -> str:
    """One HTML page: the results tables laid out to fit the page, then the parameters each method used."""
    grids = layout(merge_results(summary), fits_page)
    params = "".join(f"<li><b>{escape(k)}</b>: {escape(str(r.get('method')))} {escape(str(r.get('params')))}</li>"
                     for k, r in summary["results"].items() if k not in REFERENCE_ROWS)
    suite = escape(str(summary.get("suite")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>polytask merge: {suite}</title>
<style>{REPORT_CSS}</style></head><body><main>
<h1>Model merging on {suite}</h1>
<p class="note">Tasks: {escape(', '.join(t['name'] for t in summary['tasks']))}; backbone pretrained on
{escape(', '.join(summary.get('pretrain_tasks', [])))}. Test scores of the merged encoder with each task's own head;
"norm." divides by the individually fine-tuned model's score (finetuned = 1). Best merged value per column (or, in
a transposed table, per row) in green.</p>
{html_tables(grids)}
<h2>Parameters used</h2><ul>{params}</ul>
<footer>polytask {escape(str(summary.get('polytask_version')))}, seed {escape(str(summary.get('seed')))},
wall time {summary.get('wall_time_s', 0):.1f} s.</footer>
</main></body></html>
"""
