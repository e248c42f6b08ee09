"""The report reads a run directory and renders a console table and one self-contained HTML page."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_well_formed
from polytask.errors import PolytaskError
from polytask.report import (
    format_results,
    line_chart,
    load_summary,
    read_metrics,
    tabulate_results,
    write_report,
)
from polytask.report.svg import nice_ticks

TASKS = ("left", "right")


def _summary() -> dict:
    metrics = [{"name": "accuracy", "higher_is_better": True}]
    return {
        "polytask_version": "0.1.0",
        "run_id": "multidigits-20261126-0412",
        "suite": {
            "name": "multidigits",
            "tasks": [{"name": t, "kind": "classification", "n_outputs": 10, "metrics": metrics} for t in TASKS],
        },
        "seed": 0,
        "versions": {"python": "3.11.7", "torch": "2.13.0", "numpy": "2.1.0", "polytask": "0.1.0"},
        "started": "2026-11-26T04:12:00Z",
        "wall_time_s": 71.3,
        "reference": "stl",
        "results": {
            "stl": {
                "kind": "single_task",
                "method": "stl",
                "tasks": {
                    "left": {"accuracy": 0.9123, "loss": 0.31},
                    "right": {"accuracy": 0.8877, "loss": 0.36},
                },
                "best_epoch": {"left": 2, "right": 3},
                "wall_time_s": 20.1,
                "delta_m": 0.0,
                "delta_m_per_task": {"left": 0.0, "right": 0.0},
            },
            "equal": {
                "kind": "joint",
                "method": "equal",
                "tasks": {
                    "left": {"accuracy": 0.9061, "loss": 0.33},
                    "right": {"accuracy": 0.8712, "loss": 0.40},
                },
                "best_epoch": 3,
                "wall_time_s": 11.2,
                "delta_m": -1.3,
                "delta_m_per_task": {"left": -0.5, "right": -2.1},
            },
        },
        "mean_rank": {"stl": 1.25, "equal": 1.75},
    }


def _metrics() -> list[dict]:
    lines = []
    for job, tasks in (("stl/left", ["left"]), ("stl/right", ["right"]), ("equal", list(TASKS))):
        for epoch in range(4):
            for task in tasks:
                loss = 1.0 / (epoch + 1)
                lines.append(
                    {
                        "job": job,
                        "epoch": epoch,
                        "step": 10 * epoch,
                        "split": "train",
                        "task": task,
                        "loss": loss,
                        "weight": 1.0,
                    }
                )
                lines.append(
                    {
                        "job": job,
                        "epoch": epoch,
                        "split": "val",
                        "task": task,
                        "loss": loss,
                        "accuracy": 0.5 + 0.1 * epoch,
                    }
                )
    return lines


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(_summary()), encoding="utf-8")
    text = "\n".join(json.dumps(r) for r in _metrics())
    (run / "metrics.jsonl").write_text(text + '\n{"job": "equal", "epo', encoding="utf-8")
    return run


def test_write_report_is_self_contained_and_complete(run_dir: Path) -> None:
    path = write_report([run_dir])
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    for text in ("multidigits-20261126-0412", "multidigits", "stl", "equal", "left", "right"):
        assert text in page
    for number in ("0.9123", "0.8712", "-1.30", "1.25", "71.3", "2.13.0"):
        assert number in page
    assert page.count("<svg") == 2 * len(TASKS)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page)
    assert "<script" not in page
    assert_well_formed(page)
    assert "1 unreadable line" in page
    assert not list(run_dir.glob("*.tmp"))


def test_curves_show_each_stl_job_only_in_its_own_task(run_dir: Path) -> None:
    page = write_report([run_dir], run_dir / "out" / "r.html").read_text(encoding="utf-8")
    figures = re.findall(r"<figure>(.*?)</figure>", page, flags=re.S)
    left_val = next(f for f in figures if "left · validation accuracy" in f)
    assert "stl/left" in left_val and "equal" in left_val and "stl/right" not in left_val


def test_several_runs_get_one_section_each(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    summary = _summary() | {"run_id": "second-run", "reference": None, "mean_rank": None}
    for result in summary["results"].values():
        result["delta_m"] = None
    (other / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    page = write_report([run_dir, other], tmp_path / "both.html").read_text(encoding="utf-8")
    assert page.count("<section") == 2 and "second-run" in page
    assert "No metrics.jsonl records" in page


def test_results_text_has_delta_m_and_best_values() -> None:
    text = format_results(_summary())
    assert "-1.30" in text and "0.00" in text
    assert "accuracy ↑" in text and "Δm%" in text and "mean rank" in text
    assert "equal" in text and "stl (ref)" in text
    model = tabulate_results(_summary())
    left = next(c for c in model.columns if c.group == "left")
    assert left.is_best(0) and not left.is_best(1)
    delta = next(c for c in model.columns if c.name == "Δm%")
    assert delta.is_best(1)


def test_table_without_reference_drops_delta_m() -> None:
    summary = _summary() | {"reference": None, "mean_rank": None}
    for result in summary["results"].values():
        del result["delta_m"]
    names = [c.name for c in tabulate_results(summary).columns]
    assert "Δm%" not in names and "mean rank" not in names and "time (s)" in names


def test_missing_summary_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PolytaskError, match=re.escape(str(tmp_path / "summary.json"))):
        write_report([tmp_path])


def test_malformed_summary_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PolytaskError, match=r"summary\.json"):
        load_summary(tmp_path)
    (tmp_path / "summary.json").write_text("[]", encoding="utf-8")
    with pytest.raises(PolytaskError, match="results"):
        load_summary(tmp_path)


def test_read_metrics_skips_torn_lines(run_dir: Path) -> None:
    records, skipped = read_metrics(run_dir)
    assert len(records) == len(_metrics()) and skipped == 1


def test_line_chart_single_point_and_constant_series() -> None:
    svg = line_chart({"a": [(1.0, 0.5)], "b": [(0.0, 2.0), (5.0, 2.0)]}, "t", "x", "y")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "nan" not in svg and "inf" not in svg
    assert line_chart({}, "empty").count("no data") == 1


def test_line_chart_escapes_text() -> None:
    svg = line_chart({"<b>&": [(0, 1), (1, 2)]}, "a < b", xlabel="x>y", ylabel='"q"')
    assert "a &lt; b" in svg and "<b>" not in svg and "&lt;b&gt;&amp;" in svg
    assert "x&gt;y" in svg and "&quot;q&quot;" in svg


@given(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.booleans(),
)
def test_nice_ticks_cover_the_range(lo: float, hi: float, integer: bool) -> None:
    ticks = nice_ticks(lo, hi, 5, integer=integer)
    slack = 1e-6 * (ticks[-1] - ticks[0])
    assert ticks[0] <= min(lo, hi) + slack and ticks[-1] >= max(lo, hi) - slack
    assert all(a < b for a, b in itertools.pairwise(ticks))
    assert 2 <= len(ticks) <= 13
