"""The report's Pareto section: non-dominated methods, one marker per method, hypervolume tables, the tasks where a
method is worse than single-task, and the multi-run front with its errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import assert_well_formed
from polytask.errors import DataError
from polytask.report.html import render_front, render_report, write_front
from polytask.report.pareto import build_front, front_charts, front_summary, has_front
from polytask.report.svg import _staircase, scatter_chart


def summary(scores: dict[str, dict[str, float]], tasks=("left", "right"), higher=True, reference="stl",
            run_id="run-a") -> dict:
    """A summary.json of one accuracy-like metric per task; ``scores``: method -> task -> value."""
    metrics = [{"name": "acc", "higher_is_better": higher}]
    return {
        "run_id": run_id,
        "suite": {"name": "hand", "tasks": [{"name": t, "metrics": metrics} for t in tasks]},
        "reference": reference if reference in scores else None,
        "results": {m: {"kind": "single_task" if m == reference else "joint", "method": m,
                        "tasks": {t: {"acc": v, "loss": 1.0} for t, v in s.items()}} for m, s in scores.items()},
    }


TWO = {
    "stl": {"left": 0.90, "right": 0.80},
    "a": {"left": 0.95, "right": 0.70},  # front: best left
    "b": {"left": 0.85, "right": 0.74},  # dominated by stl
    "c": {"left": 0.88, "right": 0.85},  # front: best right; worse than stl on left
}


def write(tmp_path: Path, name: str, data: dict) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    return run


well_formed = assert_well_formed


def pareto_part(page: str) -> str:
    start = page.index("<h2>Pareto front</h2>")
    return page[start:page.index("<h2>Training curves</h2>", start)]


def test_section_shows_the_non_dominated_methods_and_one_marker_each(tmp_path):
    page = render_report([write(tmp_path, "run", summary(TWO))])
    well_formed(page)
    part = pareto_part(page)
    svgs = re.findall(r"<svg.*?</svg>", part, flags=re.S)
    assert len(svgs) == 1
    markers = re.findall(r'<(circle|rect) data-label="([^"]+)"[^>]*fill="([^"]+)"', svgs[0])
    assert sorted(m for _, m, _ in markers) == sorted(TWO)  # one marker per method
    filled = {m for _, m, fill in markers if fill != "#fff"}
    assert filled == {"stl", "a", "c"}
    assert [m for shape, m, _ in markers if shape == "rect"] == ["stl"]  # the single-task square
    assert "stroke-dasharray" in svgs[0]  # the staircase
    row = re.search(r"<td class='label'>non-dominated</td><td class='label'>([^<]*)</td>", part)
    assert row and row.group(1) == "stl, a, c"


def test_worse_than_single_task_column(tmp_path):
    part = pareto_part(render_report([write(tmp_path, "run", summary(TWO))]))
    cells = dict(re.findall(r"<tr><td class='label'>(\w+)</td>.*?<td class='label(?: worse)?'>([^<]*)</td></tr>",
                            part.split("per method</caption>")[1]))
    assert cells["stl"] == "(reference)"
    assert cells["a"] == "right (+12.5%)"  # 0.70 vs 0.80
    assert cells["b"] == "left (+5.6%), right (+7.5%)"
    assert cells["c"] == "left (+2.2%)"


def test_front_data_hypervolumes():
    front = build_front([("run-a", summary(TWO))])
    data = front_summary(front)
    assert data["non_dominated"] == ["stl", "a", "c"]
    assert data["single_task"] == "stl" and data["objectives"].startswith("relative change")
    assert data["worse_than_single_task"] == {"a": ["right"], "b": ["left", "right"], "c": ["left"]}
    assert data["hypervolume_above_single_task"] == 0.0  # no method beats stl on both tasks
    assert 0 < data["hypervolume_joint"] < data["hypervolume"]
    # better than stl on both: a positive volume above single-task
    better = build_front([("r", summary({**TWO, "d": {"left": 0.99, "right": 0.88}}))])
    assert front_summary(better)["hypervolume_above_single_task"] == pytest.approx(0.1 * 0.1, rel=1e-9)


def test_three_tasks_get_pairwise_projections(tmp_path):
    tasks = ("t0", "t1", "t2")
    scores = {"stl": dict(zip(tasks, (0.5, 0.5, 0.5), strict=True)),
              "x": dict(zip(tasks, (0.9, 0.1, 0.1), strict=True)),
              "y": dict(zip(tasks, (0.4, 0.4, 0.4), strict=True))}
    page = render_report([write(tmp_path, "run", summary(scores, tasks))])
    well_formed(page)
    svgs = re.findall(r"<svg.*?</svg>", pareto_part(page), flags=re.S)
    assert len(svgs) == 3  # (t0, t1), (t0, t2), (t1, t2)
    for svg in svgs:
        assert svg.count("data-label=") == 3 and "stroke-dasharray" not in svg
        # x is non-dominated in the full space: filled in every projection, although dominated in (t1, t2)
        assert re.search(r'data-label="x"[^>]*fill="#[0-9a-f]{6}"', svg)
        assert re.search(r'data-label="y"[^>]*fill="#fff"', svg)


def test_no_section_for_one_joint_method_or_one_task(tmp_path):
    one_joint = summary({"stl": TWO["stl"], "a": TWO["a"]})
    assert not has_front(one_joint)
    assert "Pareto front" not in render_report([write(tmp_path, "r1", one_joint)])
    one_task = summary({m: {"left": s["left"]} for m, s in TWO.items()}, tasks=("left",))
    assert not has_front(one_task)


def test_without_single_task_scores_are_raw_and_nothing_is_marked(tmp_path):
    scores = {m: s for m, s in TWO.items() if m != "stl"}
    front = build_front([("r", summary(scores, higher=False))])  # lower is better now
    data = front_summary(front)
    assert data["single_task"] is None and "worse_than_single_task" not in data
    assert data["non_dominated"] == ["a", "b"]  # lowest right, lowest left; c is dominated by b
    assert data["objectives"] == "scores (minimise form)"
    part = pareto_part(render_report([write(tmp_path, "r", summary(scores, higher=False))]))
    assert "worse than single-task" not in part
    with pytest.raises(DataError, match="no run has a single-task row"):
        build_front([("r", summary(scores))], normalise_by_baseline=True)


def test_a_method_missing_a_score_is_left_out_with_a_note(tmp_path):
    data = summary(TWO)
    data["results"]["b"]["tasks"]["right"]["acc"] = None
    part = pareto_part(render_report([write(tmp_path, "r", data)]))
    assert "b is left out: no finite test score for task(s) right." in part
    assert re.findall(r'data-label="(\w+)"', part) == ["stl", "a", "c"]


def test_unknown_direction_gives_a_note_not_a_crash(tmp_path):
    data = summary(TWO)
    for task in data["suite"]["tasks"]:
        task["metrics"] = [{"name": "acc"}]
    page = render_report([write(tmp_path, "r", data)])
    assert ("No Pareto front: run &#x27;run-a&#x27;: task &#x27;left&#x27; metric &#x27;acc&#x27; has no direction"
            in page)


def test_several_runs_share_one_front_and_must_share_tasks(tmp_path):
    r1 = write(tmp_path, "r1", summary(TWO, run_id="one"))
    r2 = write(tmp_path, "r2", summary({"stl": TWO["stl"], "z": {"left": 0.97, "right": 0.9}}, run_id="two"))
    path, data = write_front([r1, r2], tmp_path / "out" / "front.html")
    page = path.read_text(encoding="utf-8")
    well_formed(page)
    assert data["non_dominated"] == ["two/z"]
    assert data["single_task"] == "one/stl" and data["runs"] == {"one": str(r1), "two": str(r2)}
    assert page.count("data-label=") == 6 and not list(path.parent.glob("*.tmp"))
    r3 = write(tmp_path, "r3", summary({"stl": {"left": 0.9, "up": 0.1}, "q": {"left": 0.9, "up": 0.2}},
                                       tasks=("left", "up"), run_id="three"))
    with pytest.raises(DataError, match="run 'three' has no task 'right'"):
        render_front([r1, r3])
    with pytest.raises(DataError, match="run 'one' has no task 'up'"):
        render_front([r1, write(tmp_path, "r4", summary(TWO | {}, tasks=("left", "right", "up"), run_id="four"))])


def test_same_run_twice_gets_unique_labels(tmp_path):
    r1 = write(tmp_path, "r1", summary(TWO, run_id="same"))
    r2 = write(tmp_path, "r2", summary(TWO, run_id="same"))
    _, data = render_front([r1, r2])
    assert list(data["points"])[:2] == ["same/stl", "same/a"] and "same#2/stl" in data["points"]
    assert data["non_dominated"] == ["same/stl", "same/a", "same/c", "same#2/stl", "same#2/a", "same#2/c"]


def test_staircase_outline_for_both_directions():
    front = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]
    # lower is better on both: the dominated region lies up and to the right, up to the corner (4, 4)
    assert _staircase(front, (False, False), (4.0, 4.0)) == [
        (1.0, 4.0), (1.0, 3.0), (2.0, 3.0), (2.0, 2.0), (3.0, 2.0), (3.0, 1.0), (4.0, 1.0), (4.0, 4.0)]
    # higher is better on both: mirrored, from the best x down to the corner (0, 0)
    assert _staircase([(3.0, 1.0), (1.0, 3.0)], (True, True), (0.0, 0.0)) == [
        (3.0, 0.0), (3.0, 1.0), (1.0, 1.0), (1.0, 3.0), (0.0, 3.0), (0.0, 0.0)]


def test_scatter_escapes_labels_and_handles_no_data():
    svg = scatter_chart({"<m>": (0.1, 0.2), "n": (float("nan"), 1.0)}, "a < b", front=["<m>"])
    assert "&lt;m&gt;" in svg and "<m>" not in svg and svg.count("data-label=") == 1
    assert "no data" in scatter_chart({}, "empty")


def test_front_charts_cap_the_projection_grid():
    tasks = tuple(f"t{i}" for i in range(8))
    scores = {m: {t: 0.1 * (i + 1) + 0.01 * k for k, t in enumerate(tasks)} for i, m in enumerate("pq")}
    assert len(front_charts(build_front([("r", summary(scores, tasks))]))) == 15  # 6 tasks, 15 pairs


def test_raw_scores_still_mark_worse_tasks_and_a_zero_baseline_shows_no_percentage(tmp_path):
    front = build_front([("r", summary(TWO))], normalise_by_baseline=False)
    assert not front.normalised and front.worse()["c"] == [("left", pytest.approx(100 * 0.02 / 0.9))]
    zero = summary({**TWO, "stl": {"left": 0.0, "right": 0.8}, "e": {"left": -0.1, "right": 0.9}})
    part = pareto_part(render_report([write(tmp_path, "r", zero)]))  # cannot normalise: raw scores
    assert front_summary(build_front([("r", zero)]))["objectives"] == "scores (minimise form)"
    assert "<td class='label worse'>right (+12.5%)</td>" in part  # a: 0.70 vs 0.80
    assert "<td class='label worse'>left</td>" in part  # e: -0.1 vs 0, no relative change
    with pytest.raises(DataError, match="stl has a score of 0"):
        build_front([("r", zero)], normalise_by_baseline=True)


def test_no_method_with_every_score_is_an_error_naming_the_runs():
    data = summary({"a": {"left": 0.9}, "b": {"right": 0.8}})
    with pytest.raises(DataError, match=r"no method of 'r' has a finite test score on every task \(left, right\)"):
        build_front([("r", data)])


def test_a_studys_run_labels_leave_out_what_every_run_id_shares():
    from polytask.report.html import _without_common_ends

    ids = ["recommender-0.0-stl-s0", "recommender-0.0-adatt-s0", "recommender-0.0-cgc-s0"]
    assert _without_common_ends(ids) == ["stl", "adatt", "cgc"]
    assert _without_common_ends(["a", "c"]) == ["a", "c"]
    assert _without_common_ends(["run-1", "run-1x"]) == ["1", "1x"]
    assert _without_common_ends(["same-x", "same-x"]) == ["same-x", "same-x"]  # nothing left to tell them apart
