"""The verdict of a grouping study: the plan with the lowest validation loss, described in one sentence."""

import pytest

from polytask.evaluation.verdict import Plan, verdict

DIR = {t: {"mse": False} for t in ("a", "b", "c", "d")}


def scores(val, mse):
    return {t: {"val_loss": v, "mse": m} for t, v, m in zip("abcd", val, mse, strict=True)}


def study(chosen_val=(0.9, 0.9, 0.9, 1.0)):
    return [
        Plan("independent", [["a"], ["b"], ["c"], ["d"]], ["equal"] * 4, scores((1, 1, 1, 1), (1, 1, 1, 1))),
        Plan("all-in-one", [["a", "b", "c", "d"]], ["equal"], scores((0.95, 0.95, 0.95, 1.5), (0.9, 1, 1.1, 1.25))),
        Plan("chosen + uw", [["a", "b", "c"], ["d"]], ["uw", "equal"],
             scores(chosen_val, (0.9, 0.95, 0.85, 1.0))),
    ]


def test_recommends_the_lowest_validation_plan_and_says_why():
    v = verdict(study(), DIR)
    assert v["plan"] == "chosen + uw"
    assert v["networks"] == [{"tasks": ["a", "b", "c"], "serves": ["a", "b", "c"], "method": "uw",
                              "delta_vs_alone_pct": pytest.approx(-10.0)}]
    assert v["alone"] == [{"task": "d", "delta_when_shared_pct": pytest.approx(25.0)}]
    assert v["text"].startswith("Train {a, b, c} together with uw (gains 10% vs alone); keep d alone: "
                                "it loses 25% when shared.")
    total = {"independent": 4.0, "all-in-one": 4.35, "chosen + uw": 3.7}
    assert v["total_val_loss"] == pytest.approx(total)
    assert "15% below all-in-one and 7.5% below independent" in v["text"]


def test_independent_models_win_when_no_grouping_beats_them():
    v = verdict(study(chosen_val=(1.2, 1.2, 1.2, 1.0)), DIR)
    assert v["plan"] == "independent" and v["networks"] == []
    assert v["text"].startswith("Train every task alone: no grouping beat independent models; keep a alone")


def test_overlapping_networks_report_the_tasks_they_serve():
    plans = study()
    plans.append(Plan("chosen", [["a", "b"], ["a", "c", "d"]], ["equal", "equal"],
                      scores((0.5, 0.5, 0.5, 0.5), (0.8, 0.8, 0.8, 0.8)), serve={"a": 0, "b": 0, "c": 1, "d": 1}))
    v = verdict(plans, DIR)
    assert v["plan"] == "chosen"
    assert [n["serves"] for n in v["networks"]] == [["a", "b"], ["c", "d"]]
    assert "train {a, c, d} together with equal for c, d (gains 20% vs alone)" in v["text"]
