"""Δm% and mean rank against hand-computed values."""

import pytest

from polytask.evaluation import delta_m, mean_rank

DIRS = {"a": {"accuracy": True}, "b": {"mse": False, "mae": False}}
REF = {"a": {"accuracy": 0.80}, "b": {"mse": 2.0, "mae": 1.0}}


def test_delta_m_hand_computed():
    scores = {"a": {"accuracy": 0.88}, "b": {"mse": 2.5, "mae": 0.9}}
    # a: accuracy up 10% -> -10 (better); b: mse +25% -> +25, mae -10% -> -10, task mean +7.5
    total, per_task = delta_m(scores, REF, DIRS)
    assert per_task["a"] == pytest.approx(-10.0)
    assert per_task["b"] == pytest.approx(7.5)
    assert total == pytest.approx(-1.25)


def test_delta_m_of_reference_is_zero():
    total, per_task = delta_m(REF, REF, DIRS)
    assert total == 0.0 and set(per_task.values()) == {0.0}


def test_delta_m_zero_reference_is_an_error():
    with pytest.raises(ValueError, match="task 'b'"):
        delta_m(REF, {"a": {"accuracy": 0.8}, "b": {"mse": 0.0, "mae": 1.0}}, DIRS)


def test_mean_rank_hand_computed():
    results = {
        "x": {"a": {"accuracy": 0.9}, "b": {"mse": 1.0, "mae": 1.0}},
        "y": {"a": {"accuracy": 0.8}, "b": {"mse": 2.0, "mae": 1.0}},
        "z": {"a": {"accuracy": 0.7}, "b": {"mse": 3.0, "mae": 2.0}},
    }
    # accuracy ranks x1 y2 z3; mse x1 y2 z3; mae: x,y tie for 1-2 -> 1.5 each, z3
    ranks = mean_rank(results, DIRS)
    assert ranks == pytest.approx({"x": (1 + 1 + 1.5) / 3, "y": (2 + 2 + 1.5) / 3, "z": 3.0})
