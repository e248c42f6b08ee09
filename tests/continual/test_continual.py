"""Continual learning: streams, the metrics of the accuracy matrix, the flow, and exact resume after SIGKILLs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from polytask.continual import STRATEGIES, Experience, Stream, build_stream, from_suite
from polytask.continual.config import ContinualConfig, load_continual_config
from polytask.continual.strategy import union
from polytask.errors import ConfigError, DataError
from polytask.evaluation.continual import continual_metrics
from polytask.flows.continual import continual
from polytask.tasks import Task, TaskData, TaskSuite, build_suite

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- streams


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_split_digits_in_every_scenario(scenario):
    s = build_stream("split-digits", {"scenario": scenario}, seed=0)
    assert s.scenario == scenario and len(s.experiences) == 5 and s.input_shape == (64,)
    seen = set()
    for i, e in enumerate(s.experiences):
        (task,) = e.tasks
        index = torch.cat([d.index for split in ("train", "val", "test") for d in e.suite.splits[split]])
        classes = {int(c) for c in load_digits().target[index.numpy()]}
        assert classes == {2 * i, 2 * i + 1}  # the default class order
        assert not seen & set(index.tolist())
        seen |= set(index.tolist())
        y = torch.cat([d.y[task.name] for d in e.suite.splits["train"]])
        want = {"task": {0, 1}, "domain": {0, 1}, "class": {2 * i, 2 * i + 1}}[scenario]
        assert set(y.long().tolist()) == want
    assert len(s.tasks) == (5 if scenario == "task" else 1)


def test_class_order_is_seeded_and_recorded():
    a = build_stream("split-digits", {"shuffle": True}, seed=1)
    b = build_stream("split-digits", {"shuffle": True}, seed=1)
    c = build_stream("split-digits", {"shuffle": True}, seed=2)
    assert a.info["groups"] == b.info["groups"] != c.info["groups"]
    order = [c for g in a.info["groups"] for c in g]
    assert sorted(order) == list(range(10)) and a.tasks[0].classes == tuple(order)
    given_order = build_stream("split-digits", {"class_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]}, seed=0)
    assert given_order.info["groups"][0] == [9, 8]
    with pytest.raises(ConfigError, match="permutation"):
        build_stream("split-digits", {"class_order": [0, 1, 2]}, seed=0)


def _suite(name, task, x, y):
    data = {s: (TaskData(x, {task.name: y}),) for s in ("train", "val", "test")}
    return TaskSuite(name, (task,), data)


def test_bad_streams_are_refused_with_the_experience_named():
    t = Task("class", "classification", 3)
    a = Experience("a", _suite("a", t, torch.randn(4, 2), torch.tensor([0.0, 1, 0, 1])))
    wide = Experience("b", _suite("b", t, torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1])))
    with pytest.raises(DataError, match="experience 'b' has inputs of shape"):
        Stream("s", "class", (a, wide))
    # a class tested but never trained
    y_train, y_test = torch.tensor([0.0, 1, 0, 1]), torch.tensor([0.0, 2, 0, 1])
    odd = TaskSuite("c", (t,), {"train": (TaskData(torch.randn(4, 2), {"class": y_train}),),
                               "val": (TaskData(torch.randn(4, 2), {"class": y_train}),),
                               "test": (TaskData(torch.randn(4, 2), {"class": y_test}),)})
    with pytest.raises(DataError, match=r"experience 'c' tests class\(es\) \[2\]"):
        Stream("s", "class", (a, Experience("c", odd)))
    with pytest.raises(DataError, match="no labelled rows"):  # an empty experience
        _suite("empty", t, torch.randn(0, 2), torch.zeros(0))
    with pytest.raises(DataError, match="no experiences"):
        Stream("s", "task", ())


def test_a_multitask_suite_as_a_stream_and_the_union_of_experiences():
    suite = build_suite("synthetic", {"d": 6, "groups": [2], "unrelated": 1, "n_train": 40, "n_val": 16,
                                      "n_test": 16}, seed=0)
    s = from_suite("syn", suite)
    assert s.scenario == "multitask" and [e.name for e in s.experiences] == suite.task_names
    both = union("u", [e.suite for e in s.experiences[:2]])
    assert both.task_names == suite.task_names[:2]
    digits = build_stream("split-digits", {"scenario": "class"}, seed=0)
    all_rows = union("all", [e.suite for e in digits.experiences])
    assert len(all_rows.splits["train"]) == 1  # one task: its sources are concatenated
    assert len(all_rows.splits["train"][0]) == sum(len(e.suite.splits["train"][0]) for e in digits.experiences)


# ---------------------------------------------------------------- metrics


def test_metrics_follow_their_definitions():
    r = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.95]]
    m = continual_metrics(r, initial=[0.1, 0.2, 0.1], reference=[0.95, 0.9, 0.9])
    assert m["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.2) + (0.2 - 0.1)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert m["intransigence"] == pytest.approx(((0.95 - 0.9) + (0.9 - 0.8) + (0.9 - 0.95)) / 3)
    one = continual_metrics([[0.7]])
    assert one["average_accuracy"] == 0.7 and one["bwt"] is None and one["forgetting"] is None


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6).flatmap(lambda t: st.lists(st.lists(st.floats(0, 1), min_size=t, max_size=t),
                                                  min_size=t, max_size=t)))
def test_forgetting_bounds_backward_transfer(r):
    """Forgetting of experience j is the drop from its best accuracy, at least the drop from R[j, j]: F >= -BWT,
    equal for two experiences."""
    m = continual_metrics(r)
    assert m["forgetting"] >= -m["bwt"] - 1e-12
    if len(r) == 2:
        assert m["forgetting"] == pytest.approx(-m["bwt"])


# ---------------------------------------------------------------- the flow


def small_config(tmp_path, strategies, scenario="class", name="run", **train):
    return {"seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": scenario}},
            "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
            "train": {"epochs": 2, "batch_size": 64, "checkpoint_every": 3, **train,
                      "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
            "strategies": strategies, "output": {"dir": str(tmp_path), "name": name}}


def test_naive_forgets_and_cumulative_does_not(tmp_path):
    cfg = ContinualConfig.model_validate(small_config(tmp_path, ["naive", "cumulative", "joint"], epochs=4,
                                                      batch_size=32))
    run_dir, summary = continual(cfg)
    naive, cumulative, joint = (summary["results"][k][0] for k in ("naive", "cumulative", "joint"))
    r = np.asarray(naive["accuracy"])
    assert r.shape == (5, 5) and np.all(np.diag(r) > 0.8)  # each experience is learnt...
    assert naive["metrics"]["forgetting"] > 0.5  # ...and forgotten in the class-incremental scenario
    assert cumulative["metrics"]["forgetting"] < 0.2
    assert cumulative["metrics"]["average_accuracy"] > naive["metrics"]["average_accuracy"] + 0.4
    assert len(joint["accuracy"]) == 1 and joint["metrics"]["average_accuracy"] > 0.8
    assert cumulative["metrics"]["intransigence"] == 0.0  # it is its own reference
    page = (run_dir / "report.html").read_text()
    assert "accuracy matrix" in page and "naive" in page
    assert json.loads((run_dir / "summary.json").read_text())["kind"] == "continual"


def test_a_strategy_refuses_a_scenario_it_does_not_support(tmp_path):
    from polytask.continual.strategy import Strategy

    class TaskOnly(Strategy):
        scenarios = ("task",)

    stream = build_stream("split-digits", {"scenario": "class"}, seed=0)
    with pytest.raises(ConfigError, match="does not apply to a class-incremental stream"):
        TaskOnly().check(stream, "task-only")


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, cwd=ROOT)


# strategies whose parameters have no defaults run the shared tests with these
EXAMPLE_PARAMS = {"compose": {"strategies": ["replay", "si"]}}  # two stateful parts: a buffer, per-step state
STATEFUL_FIRST = sorted(STRATEGIES.names(), key=lambda n: (n in ("naive", "cumulative", "joint"), n))


# strategies that need another model or stream (a pretrained encoder) run the same kills in their own test file
OWN_RESUME_TEST = {"l2p"}


def first_scenario(strategy):
    """The scenario the shared tests run ``strategy`` in: class-incremental where it applies."""
    built = STRATEGIES.build(strategy, EXAMPLE_PARAMS.get(strategy, {}), where="test")
    return "class" if "class" in built.scenarios else built.scenarios[0]


# the kill between experiences exercises the flow's end-of-experience bookkeeping: a buffer filled at the end, Fisher
# matrices measured there, experts and a selector trained there
BETWEEN = {"replay", "ewc", "tame"}


@pytest.mark.parametrize("strategy", [s for s in STATEFUL_FIRST if s not in OWN_RESUME_TEST])
def test_sigkills_inside_and_between_experiences_resume_bit_identically(tmp_path, strategy):
    """Every registered strategy: a run SIGKILLed mid-experience, after a checkpoint (and, for a few, again at the end
    of an experience, before its weights land) resumes to the same weights and matrix as a run that never stopped.
    Every checkpoint and end state is written (interval 0), so the kills fall at known places."""
    cfg = small_config(tmp_path, [{"name": strategy, "params": EXAMPLE_PARAMS.get(strategy, {})}],
                       scenario=first_scenario(strategy), name="straight", epochs=1, checkpoint_interval_s=0)
    straight, _ = continual(ContinualConfig.model_validate(cfg))
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output": {"dir": str(tmp_path), "name": "killed"}}))
    killed = tmp_path / "killed"
    out = _cli(["continual", str(path), "--quiet"], {"POLYTASK_KILL_AT": "step:5"})  # inside an experience
    assert out.returncode == -9, out.stderr
    if strategy in BETWEEN:
        out = _cli(["continual", "--resume", str(killed), "--quiet"], {"POLYTASK_KILL_AT": "write:end.safetensors:1"})
        assert out.returncode == -9, out.stderr  # between experiences: its end state not written yet
    continual(None, resume=killed)
    for d in sorted((straight / "jobs").glob("*/*")):
        twin = killed / "jobs" / d.parent.name / d.name
        assert (twin / "end.safetensors").read_bytes() == (d / "end.safetensors").read_bytes(), d
    want = json.loads((straight / "summary.json").read_text())["results"]
    got = json.loads((killed / "summary.json").read_text())["results"]
    for a, b in zip(want[strategy], got[strategy], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["metrics"] == b["metrics"] and a["steps"] == b["steps"] > 0


def test_progress_an_os_crash_cut_or_lost_is_trained_again_to_the_same_bytes(tmp_path):
    """An experience's end state (no folder fsync) and done.json (no fsync) are progress: after an OS crash either may
    be missing, and done.json cut. Such an experience, and every one after it, trains again, to the same end states
    and matrix as the run that never stopped."""
    import shutil

    cfg = small_config(tmp_path, ["naive"], name="straight", epochs=1, checkpoint_interval_s=0)
    straight, want = continual(ContinualConfig.model_validate(cfg))
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    jobs = crashed / "jobs" / "naive-s0"
    cut = jobs / "e2" / "done.json"
    cut.write_bytes(cut.read_bytes()[:40])
    (jobs / "e3" / "end.safetensors").unlink()
    (jobs / "e4" / "done.json").unlink()
    stamps = {d.name: (d / "end.safetensors").stat().st_mtime_ns for d in (jobs / "e0", jobs / "e1")}
    (crashed / "summary.json").unlink()
    _, got = continual(None, resume=crashed)
    for d in sorted((straight / "jobs" / "naive-s0").glob("e*")):
        assert (jobs / d.name / "end.safetensors").read_bytes() == (d / "end.safetensors").read_bytes(), d
    assert {d: (jobs / d / "end.safetensors").stat().st_mtime_ns for d in stamps} == stamps  # e0, e1 not redone
    assert got["results"]["naive"][0]["accuracy"] == want["results"]["naive"][0]["accuracy"]
    assert got["results"]["naive"][0]["steps"] == want["results"]["naive"][0]["steps"] == 5 * 4  # e0, e1 from records


def test_end_states_follow_the_checkpoint_interval_and_a_run_without_one_trains_again_to_the_same_bytes(tmp_path):
    """An interval longer than the run: only the last experience writes its end state; every experience's record lands
    as it ends, the last one's after that end state. A run killed as that end state is written has the earlier
    records but no end state to start from: it trains every experience again, to the same end state and matrix as the
    run that never stopped."""
    cfg = small_config(tmp_path, ["replay"], name="straight", epochs=1, checkpoint_interval_s=1e6)
    straight, want = continual(ContinualConfig.model_validate(cfg))
    jobs = straight / "jobs" / "replay-s0"
    assert [p.parent.name for p in jobs.glob("e*/end.safetensors")] == ["e4"]
    assert all(json.loads((jobs / f"e{i}" / "done.json").read_text())["steps"] == 4 for i in range(5))
    assert want["results"]["replay"][0]["steps"] == 5 * 4
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output": {"dir": str(tmp_path), "name": "killed"}}))
    killed = tmp_path / "killed"
    out = _cli(["continual", str(path), "--quiet"], {"POLYTASK_KILL_AT": "write:end.safetensors:1"})
    assert out.returncode == -9, out.stderr
    assert [p.parent.name for p in sorted((killed / "jobs").glob("*/*/done.json"))] == ["e0", "e1", "e2", "e3"]
    assert not list((killed / "jobs").glob("*/*/end.*"))
    _, got = continual(None, resume=killed)
    end = killed / "jobs" / "replay-s0" / "e4" / "end.safetensors"
    assert end.read_bytes() == (jobs / "e4" / "end.safetensors").read_bytes()
    assert got["results"]["replay"][0]["accuracy"] == want["results"]["replay"][0]["accuracy"]


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stream": {"name": "split-digits", "params": {"scenario": "sideways"}}}))
    with pytest.raises(ConfigError, match=r"stream\.params\.scenario"):
        load_continual_config(path)
    path.write_text(yaml.safe_dump({"strategies": ["naiv"]}))
    with pytest.raises(ConfigError, match="did you mean 'naive'"):
        load_continual_config(path)


def test_composed_strategies_add_their_losses_and_keep_their_own_state():
    from polytask.continual.strategy import Composite, Cumulative, Strategy, build_strategy

    class Const(Strategy):
        def __init__(self, name, value):
            super().__init__()
            self.name, self.value, self.calls = name, value, 0

        def extra_loss(self, run, step):
            self.calls += 1
            return torch.tensor(self.value)

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    both = Composite([Const("a", 1.0), Const("b", 2.5)])
    assert float(both.extra_loss(None, None)) == 3.5 and both.name == "a+b"
    state = both.state_dict()
    assert state == {"a": {"calls": 1}, "b": {"calls": 1}}
    again = Composite([Const("a", 1.0), Const("b", 2.5)])
    again.load_state_dict(state)
    assert again.state_dict() == state
    with pytest.raises(ConfigError, match="two or more different"):
        Composite([Const("a", 1.0), Const("a", 2.0)])
    class OtherCumulative(Cumulative):
        name = "cumulative-2"

    with pytest.raises(ConfigError, match="change the training data"):
        Composite([Cumulative(), OtherCumulative()])
    with pytest.raises(ConfigError, match="joint"):
        build_strategy("compose", {"strategies": ["naive", "joint"]}, "strategies.0.params")
