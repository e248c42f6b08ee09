"""Every registered strategy on every scenario of split-digits: it runs where it says it applies, and anywhere else
the config error names the scenario (issue 10's "runs on every scenario it supports")."""

import math

import pytest

from polytask.continual import STRATEGIES, build_stream
from polytask.continual.config import ContinualConfig
from polytask.errors import ConfigError
from polytask.flows.continual import continual

NEEDS_ENCODER = {"l2p"}  # a frozen pretrained transformer: its scenarios run in tests/continual/test_l2p.py
PARAMS = {"compose": {"strategies": ["replay", "lwf"]}}
SCENARIOS = ("task", "class", "domain")


def _built(name):
    return STRATEGIES.build(name, PARAMS.get(name, {}), where="test")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_strategy_runs_where_it_applies_and_names_the_scenario_where_not(tmp_path, scenario):
    stream = build_stream("split-digits", {"scenario": scenario, "classes_per_experience": 5}, seed=0)
    names = [n for n in STRATEGIES.names() if n not in NEEDS_ENCODER]
    runs = [n for n in names if scenario in _built(n).scenarios]
    for n in set(names) - set(runs):
        with pytest.raises(ConfigError, match=f"{scenario}-incremental"):
            _built(n).check(stream, n)
    cfg = {"seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": scenario,
                                                                      "classes_per_experience": 5}},
           "model": {"backbone": "mlp", "backbone_params": {"hidden": [16]}},
           "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
           "strategies": [{"name": n, "params": PARAMS.get(n, {})} for n in runs],
           "output": {"dir": str(tmp_path), "name": scenario}}
    _, summary = continual(ContinualConfig.model_validate(cfg))
    assert set(summary["results"]) == set(runs)
    for n, (r,) in summary["results"].items():
        rows = r["accuracy"]
        assert len(rows) == (1 if r["joint"] else 2), n
        assert all(len(row) == 2 and all(0 <= a <= 1 and not math.isnan(a) for a in row) for row in rows), n
        assert r["state_numel"] >= 0 and isinstance(r["added_numel"], int), n


@pytest.mark.parametrize("other", ["ewc", "lwf", "si", "mas"])
def test_rank_updates_composes_with_the_regularisers(tmp_path, other):
    """Incremental rank updates freeze earlier experiences' weights; a regulariser beside it protects what still
    trains (the frozen part cannot move) instead of failing on it, and earlier tasks keep their accuracy."""
    cfg = {"seeds": [0],
           "stream": {"name": "split-digits", "params": {"scenario": "task", "classes_per_experience": 5}},
           "model": {"backbone": "mlp", "backbone_params": {"hidden": [16]}},
           "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
           "strategies": [{"name": "compose", "params": {"strategies": ["rank_updates", other]}}],
           "output": {"dir": str(tmp_path), "name": other}}
    _, summary = continual(ContinualConfig.model_validate(cfg))
    ((r,),) = summary["results"].values()
    assert r["accuracy"][1][0] == r["accuracy"][0][0]  # the first task's outputs did not change
