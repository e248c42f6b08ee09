"""Results stay readable with many tasks: summary columns first, nothing cut, significant digits.

What a browser shows is checked by ``scripts/screenshot_report`` (headless Chromium); here are the layout
properties that can be checked without one.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.report import format_number, format_results, layout, tabulate_results
from polytask.report.console import Grid, column_decimals
from polytask.report.html import fits_page, render_report
from polytask.report.svg import format_tick, line_chart, nice_ticks

METHODS = ("stl", "equal", "uw", "pcgrad", "cagrad", "nashmtl", "aligned_mtl", "famo", "upgrad")
SUMMARY = ("Δm%", "mean rank", "time (s)")


def wide_summary(n_tasks: int = 11, methods: tuple[str, ...] = METHODS, big: float = 5.29e6,
                 small: float = 1.2e-4) -> dict:
    """A run with many tasks: accuracies, regression MSE around ``big`` and MAE around ``small``."""
    tasks = []
    for i in range(n_tasks):
        if i % 3 == 2:
            metrics = [{"name": "mse", "higher_is_better": False}, {"name": "mae", "higher_is_better": False}]
            tasks.append({"name": f"target_{i}_spend", "kind": "regression", "metrics": metrics})
        else:
            metrics = [{"name": "accuracy", "higher_is_better": True}]
            tasks.append({"name": f"task_{i}_clicked", "kind": "classification", "metrics": metrics})
    results = {}
    for j, method in enumerate(methods):
        scores = {t["name"]: ({"mse": big * (1 + 0.1 * j), "mae": small * (1 + j)} if t["kind"] == "regression"
                              else {"accuracy": 0.8 + 0.01 * j - 0.003 * i}) for i, t in enumerate(tasks)}
        results[method] = {"tasks": scores, "delta_m": 0.0 if j == 0 else 17858.3 * j, "wall_time_s": 12.3 * (j + 1)}
    return {"run_id": "wide", "suite": {"name": "table", "tasks": tasks}, "reference": methods[0],
            "results": results, "mean_rank": {m: 1 + 0.5 * j for j, m in enumerate(methods)}}


def test_summary_columns_come_before_the_per_task_columns() -> None:
    columns = tabulate_results(wide_summary(n_tasks=2)).columns
    assert [c.name for c in columns[:3]] == list(SUMMARY)
    assert all(c.group for c in columns[3:]) and not any(c.group for c in columns[:3])
    header = next(line for line in format_results(wide_summary(n_tasks=2)).splitlines() if "Δm%" in line)
    assert header.index("Δm%") < header.index("mean rank") < header.index("time (s)") < header.index("accuracy")


def test_eleven_tasks_at_120_columns_cut_no_header_or_value() -> None:
    summary = wide_summary()
    text = format_results(summary, width=120)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "…" not in text
    for task in summary["suite"]["tasks"]:
        assert re.search(rf"\b{task['name']}\b", text)
    for name in (*METHODS, "stl (ref)", *SUMMARY, "accuracy ↑", "mse ↓", "mae ↓"):
        assert name in text
    # every value of the model appears whole, summary first
    model = tabulate_results(summary)
    for column in model.columns:
        for row in range(len(model.methods)):
            assert column.text(row) in text
    assert text.index("Δm%") < text.index("task_0_clicked")


def test_many_tasks_are_transposed_into_rows_of_task_metrics() -> None:
    model = tabulate_results(wide_summary())
    grids = layout(model, lambda grid: sum(grid.widths()) + 3 * len(grid.widths()) <= 120)
    assert [h for _, h in grids[0].headers] == ["Δm% ↓", "mean rank ↓", "time (s) ↓"]
    per_task = grids[1:]
    assert per_task and all(g.label_headers == ("task", "metric") for g in per_task)
    assert [h for g in per_task for _, h in g.headers] == [model.label(m) for m in METHODS]
    assert len(per_task[0].rows) == sum(1 for c in model.columns if c.group)


def test_few_tasks_keep_one_table_with_the_summary_first() -> None:
    grids = layout(tabulate_results(wide_summary(n_tasks=2)), lambda grid: True)
    assert len(grids) == 1 and grids[0].label_headers == ("method",)
    assert [h for _, h in grids[0].headers][:3] == ["Δm% ↓", "mean rank ↓", "time (s) ↓"]


def test_html_tables_fit_the_page_and_lead_with_the_summary() -> None:
    model = tabulate_results(wide_summary())
    grids = layout(model, fits_page)
    assert all(fits_page(g) for g in grids) and len(grids) >= 2
    whole = layout(model, lambda grid: True)[0]
    assert not fits_page(whole)  # the 11-task table did need the wide layout


def test_html_report_of_many_tasks_has_the_summary_before_the_task_metrics(tmp_path) -> None:
    import json

    run = tmp_path / "wide"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(wide_summary()), encoding="utf-8")
    page = render_report([run])
    tables = re.findall(r"<table class='results'>(.*?)</table>", page, flags=re.S)
    assert len(tables) >= 2
    assert "Δm%" in tables[0] and "task_0_clicked" not in tables[0]
    assert all("task_0_clicked" in t for t in tables[1:])
    assert "5.290e6" in page and "0.0000<" not in page


@pytest.mark.parametrize(("values", "expected"), [
    ((5.29e6, 6.1e6), ("5.290e6", "6.100e6")),
    ((1.2e-4, 3.4e-4), ("1.200e-4", "3.400e-4")),
    ((0.9123, 1.2e-5), ("0.9123", "1.200e-5")),   # a tiny value beside large ones is not shown as 0.0000
    ((17858.3, 0.0), ("17858", "0")),
    ((0.9123, 0.0), ("0.9123", "0.0000")),
    ((12.345, 3.0), ("12.35", "3.00")),
])
def test_values_are_shown_with_significant_digits(values: tuple[float, ...], expected: tuple[str, ...]) -> None:
    decimals = column_decimals(values)
    assert tuple(format_number(v, decimals) for v in values) == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e12, 1e12, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-12),
                min_size=1, max_size=6))
def test_no_value_is_rounded_to_nothing(values: list[float]) -> None:
    decimals = column_decimals(values)
    for v in values:
        text = format_number(v, decimals)
        assert len(text) <= 12
        shown = float(text)
        if v == 0:
            assert shown == 0
        else:
            assert shown != 0 and math.copysign(1, shown) == math.copysign(1, v)
            # the largest value of a column keeps 4 digits; none is rounded to nothing
            assert abs(shown - v) <= 0.05 * abs(v) + 10.0 ** -(decimals or 0) / 2


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 16), st.integers(1, 14), st.sampled_from([1.0, 6e6, 1e-4, 123456.789]))
def test_any_run_fits_120_columns_without_cutting(n_tasks: int, n_methods: int, big: float) -> None:
    methods = tuple(f"method_{i}" for i in range(n_methods))
    text = format_results(wide_summary(n_tasks, methods, big=big, small=big * 1e-5), width=120)
    assert max(len(line) for line in text.splitlines()) <= 120 and "…" not in text
    assert all(m in text for m in methods)


def test_a_split_table_keeps_its_row_labels_in_every_part() -> None:
    model = tabulate_results(wide_summary(n_tasks=1, methods=tuple(f"m{i}" for i in range(6))))
    grids = layout(model, lambda g: g.label_headers == ("task", "metric") and len(g.headers) <= 2)
    per_task = [g for g in grids if g.label_headers == ("task", "metric")]
    assert [[h for _, h in g.headers] for g in per_task] == [["m0 (ref)", "m1"], ["m2", "m3"], ["m4", "m5"]]
    assert all(g.rows[0].labels == ("task_0_clicked", "accuracy ↑") for g in per_task)
    assert Grid("t", ("task",), (("", "m0"), ("grp", "m1")), ()).widths() == [4, 2, 3]


def test_tick_labels_tell_every_tick_apart_and_fit_the_chart() -> None:
    for lo, hi in ((5.2e6, 5.225e6), (612345.5, 612348.0), (-250001.5, -250000.25), (1.2e-4, 1.25e-4)):
        ticks = nice_ticks(lo, hi, 5)
        labels = [format_tick(t, ticks) for t in ticks]
        assert len(set(labels)) == len(ticks), labels
        svg = line_chart({"a": [(0, lo), (1, hi)]}, "t", "epoch", "metric ↓")
        for x, label in re.findall(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="end"[^>]*>([^<]+)</text>', svg):
            # right-aligned tick label: its left end (6.6 px a character at 11 px) clears the rotated axis label
            assert float(x) - 6.6 * len(label) >= 20, (label, x)
