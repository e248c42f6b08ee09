"""Replay scheduling (Klasson et al. 2023): the schedule's validation, the memory's composition and the rows replayed,
the paper's action space, MCTS's UCT selection and search on a synthetic reward, and one search on split-digits."""

import json
import math
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.continual import STRATEGIES, Stream, build_strategy, build_stream
from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.replay_schedule import apportion
from polytask.engine import checkpoint
from polytask.engine.data import Batch
from polytask.engine.hooks import StepView
from polytask.errors import ConfigError
from polytask.flows.continual import continual, experience_score
from polytask.flows.schedule_search import (
    Node,
    action_count,
    action_space,
    best_child,
    equal_task_schedule,
    mcts,
    random_action,
    random_search,
    search,
    search_schedule,
    uct_score,
    validation_stream,
)
from polytask.models import build_model

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


# ---------------------------------------------------------------- the schedule and the memory


def test_a_bad_schedule_is_a_config_error_that_names_the_entry():
    cases = [([[1.0], [1.0]], r"schedule\[1\] \(experience 2\) gives 1 proportion"),
             ([[1.0], [1.5, -0.5]], r"schedule\[1\] \(experience 2\): proportion 1 \(experience 1\) is -0.5"),
             ([[1.0], [0.5, 0.4]], r"schedule\[1\] \(experience 2\) sums to 0.9, not 1"),
             ([[0.5]], r"schedule\[0\] \(experience 1\) sums to 0.5")]
    for schedule, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            STRATEGIES.params_for("replay_schedule", {"schedule": schedule}, "strategies.0.params")
        assert "strategies.0.params.schedule" in str(e.value)
    stream = build_stream("split-digits", {"scenario": "class"}, 0)
    short = build_strategy("replay_schedule", {"schedule": [[1.0], [0.5, 0.5]]}, "p")
    with pytest.raises(ConfigError, match="schedule has 2 entries; stream 'split-digits' has 5 experiences, so give 4"):
        short.check(stream, "rs")
    with pytest.raises(ConfigError, match="floor 30 rows for each of the 4 earlier experiences"):
        build_strategy("replay_schedule", {"floor": 30, "memory": 100}, "p").check(stream, "rs")
    build_strategy("replay_schedule", {"schedule": [[1.0], [1 / 3, 2 / 3], [0, 0, 1], [0.25] * 4]}, "p").check(
        stream, "rs")


def test_apportion_by_hand():
    assert apportion([1 / 3] * 3, 10, [99] * 3) == [4, 3, 3]  # largest remainder, the older first on ties
    assert apportion([2 / 3, 1 / 3, 0], 9, [99] * 3) == [6, 3, 0]  # exact shares, no 5.999...
    assert apportion([0.5, 0.5, 0], 10, [2, 99, 99]) == [2, 8, 0]  # a capped share goes to a positive one...
    assert apportion([0.5, 0.5, 0], 10, [2, 3, 99]) == [2, 3, 0]  # ...never to one the schedule leaves out
    assert apportion([0, 0.5, 0.5], 10, [99] * 3, floor=2) == [2, 4, 4]  # floors first, then the shares


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5).flatmap(lambda t: st.tuples(
    st.sampled_from(action_space(t)), st.lists(st.integers(0, 40), min_size=t, max_size=t), st.integers(0, 120),
    st.integers(0, 3))))
def test_apportion_properties(case):
    """Never more than held; the floor of each; left-out experiences only their floor; uncapped shares within one row
    of p_j times the rows left after the floors; the memory full whenever the positive shares have the rows."""
    p, available, total, floor = case
    floor = min(floor, total // len(p))
    n = apportion(p, total, available, floor)
    base = [min(floor, a) for a in available]
    assert all(b <= k <= a for b, k, a in zip(base, n, available, strict=True))
    assert all(k == b for k, b, q in zip(n, base, p, strict=True) if q == 0)
    rest = total - sum(base)
    if all(b + math.ceil(q * rest) <= a for b, q, a in zip(base, p, available, strict=True)):
        assert sum(n) == total
        assert all(abs(k - b - q * rest) < 1 for k, b, q in zip(n, base, p, strict=True))
    if sum(a - b for a, b, q in zip(available, base, p, strict=True) if q > 0) >= rest:
        assert sum(n) == total


def _through(strategy, stream, index, seed=5):
    """The strategy's store filled with experiences before ``index``, experience ``index`` begun."""
    strategy.seed = seed
    model = torch.nn.Linear(1, 1)
    for i in range(index):
        strategy.begin(stream, i)
        strategy.end(model, stream, i, CPU)
    strategy.begin(stream, index)


def _replayed(strategy, stream, index, steps, batch=8):
    """The experience of every row replayed over ``steps`` steps of experience ``index``."""
    src = stream.experiences[index].suite.splits["train"][0]
    run = types.SimpleNamespace(model=None, device=CPU, tasks=list(stream.experiences[index].tasks),
                                data=types.SimpleNamespace(batch_size=batch))
    seen = []
    for s in range(steps):
        strategy.on_step(run, StepView(0, s, s, Batch([src], [torch.arange(batch)])))
        drawn = strategy.buffer.take(strategy.slots) if strategy.joined else \
            strategy.batches[0] if strategy.batches else None  # joined to the batch (class scenario): its slots
        if drawn is not None:
            assert len(drawn.data) == batch
            seen += drawn.experience.tolist()
    return seen


def test_the_replayed_rows_follow_the_schedule():
    """The memory of experience t holds apportion(p_t, M) rows of each earlier experience, class-balanced within
    it; over many steps the rows replayed come from the earlier experiences in the schedule's proportions (a left-out
    experience never), and the draws are a pure function of the seed."""
    stream = build_stream("split-digits", {"scenario": "class"}, 0)
    schedule = [[1.0], [0.5, 0.5], [0.0, 0.25, 0.75], [0.5, 0.0, 0.0, 0.5]]
    for index in (2, 3, 4):
        rs = build_strategy("replay_schedule", {"schedule": schedule, "memory": 40, "batch_size": 8}, "p")
        _through(rs, stream, index)
        p = schedule[index - 1]
        held = Counter(rs.buffer.experience[rs.memory].tolist())
        assert [held.get(j, 0) for j in range(index)] == apportion(p, 40, [200] * index)
        for j in range(index):  # class-balanced within an experience
            classes = Counter(rs.buffer.y["class"][rs.memory][rs.buffer.experience[rs.memory] == j].long().tolist())
            assert not classes or max(classes.values()) - min(classes.values()) <= 1
        rows = _replayed(rs, stream, index, 300)
        freq = Counter(rows)
        for j in range(index):
            assert abs(freq.get(j, 0) / len(rows) - p[j]) < 0.03, (index, j, freq)
            if p[j] == 0:
                assert j not in freq
        again = build_strategy("replay_schedule", {"schedule": schedule, "memory": 40, "batch_size": 8}, "p")
        _through(again, stream, index)
        assert _replayed(again, stream, index, 300) == rows


def test_the_default_is_the_equal_task_schedule_and_the_memory_is_not_state(tmp_path):
    stream = build_stream("split-digits", {"scenario": "task"}, 0)
    rs = build_strategy("replay_schedule", {"memory": 30}, "p")
    _through(rs, stream, 3)
    assert Counter(rs.buffer.experience[rs.memory].tolist()) == {0: 10, 1: 10, 2: 10}
    assert equal_task_schedule(5)[2] == rs.proportions(3) == [1 / 3] * 3
    sample = rs.draw(30, 0, 0)  # each row keeps its own task's label only (its own head in the task scenario)
    for j in range(3):
        labelled = ~torch.isnan(sample.data.y[f"e{j}"])
        assert torch.equal(labelled, sample.experience == j)
    state = rs.state_dict()
    assert set(state) == {"buffer"}  # the memory is composed again from the store
    other = build_strategy("replay_schedule", {"memory": 30}, "p")
    other.seed = rs.seed
    other.begin(stream, 3)
    other.load_state_dict(checkpoint.load(checkpoint.save(tmp_path / "rs.safetensors", state)))
    assert torch.equal(other.memory, rs.memory)


@pytest.mark.parametrize("scenario", ["task", "domain", "multitask"])
def test_it_runs_in_every_scenario(tmp_path, scenario):
    stream = {"name": "split-digits", "params": {"scenario": scenario, "classes_per_experience": 5}} \
        if scenario != "multitask" else {"name": "suite", "params": {"name": "synthetic", "params": {
            "d": 6, "groups": [2], "unrelated": 1, "n_train": 40, "n_val": 16, "n_test": 16}}}
    cfg = ContinualConfig.model_validate({
        "seeds": [0], "stream": stream, "model": {"backbone": "mlp", "backbone_params": {"hidden": [16]}},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}},
        "strategies": [{"name": "replay_schedule", "params": {"memory": 20, "size": 100}}],
        "output": {"dir": str(tmp_path), "name": scenario}})
    _, summary = continual(cfg)
    (result,) = summary["results"]["replay_schedule"]
    assert all(math.isfinite(v) for row in result["accuracy"] for v in row)
    assert result["state_numel"] > 0


# ---------------------------------------------------------------- the action space and the search


def test_the_action_space_is_the_papers():
    for t in range(1, 6):
        actions = action_space(t)
        assert len(actions) == len(set(actions)) == action_count(t) == math.comb(2 * t - 1, t)  # 1, 3, 10, 35, 126
        assert all(len(a) == t and abs(sum(a) - 1) < 1e-12 for a in actions)
        assert all(abs(v * t - round(v * t)) < 1e-9 for a in actions for v in a)  # t slots
        assert tuple([1 / t] * t) in actions  # the equal task schedule is one of them
    draws = Counter(random_action(3, 7, i) for i in range(5000))
    assert set(draws) == set(action_space(3))
    chi2 = sum((c - 500) ** 2 / 500 for c in draws.values())
    assert chi2 < 27.9  # uniform: the 99.9% quantile of chi-square with 9 degrees of freedom
    assert random_action(4, 1, 2) == random_action(4, 1, 2)
    assert len(action_space(10)) == 92378  # the longest stream MCTS searches: 11 experiences
    with pytest.raises(ConfigError, match="experience 11 has 352716 actions"):
        action_space(11)


def test_uct_picks_the_largest_score():
    def node(best, visits):
        return Node(visits=visits, best=best, total=best * visits)

    parent = Node(visits=10, children=[node(0.9, 6), node(0.8, 3), node(0.5, 1)])
    for c in (0.0, 0.1, 0.5, 5.0):
        scores = [ch.best + c * math.sqrt(2 * math.log(10) / ch.visits) for ch in parent.children]
        assert best_child(parent, c) is parent.children[scores.index(max(scores))]
        assert uct_score(0.9, 10, 6, c) == pytest.approx(scores[0])
    assert best_child(parent, 0.0) is parent.children[0]  # exploitation: the largest reward
    assert best_child(parent, 5.0) is parent.children[2]  # exploration: the least visited


def _tree_nodes(tree, depth=0):
    yield tree, depth
    for child in tree["children"]:
        yield from _tree_nodes(child, depth + 1)


def test_mcts_selects_by_uct_and_its_tree_counts_every_rollout():
    """Three experiences (levels of 1 and 3 actions), a reward of the last action: the rollouts expand the three
    leaves, then revisit the best one while the exploration bonus is small (c = 0.1) and the least visited when it
    is large (c = 10)."""
    value = {(1.0, 0.0): 0.9, (0.5, 0.5): 0.6, (0.0, 1.0): 0.3}

    def reward(schedule):
        return value[tuple(schedule[1])]

    small = mcts(3, 6, reward, c=0.1, seed=0)
    last = [tuple(e["schedule"][1]) for e in small["trace"]]
    assert set(last[1:4]) == set(value)  # iterations 1-3 expand the three leaves
    assert last[4] == last[5] == (1.0, 0.0)  # then the largest reward, twice
    large = mcts(3, 6, reward, c=10.0, seed=0)
    last = [tuple(e["schedule"][1]) for e in large["trace"]]
    assert last[4] == (1.0, 0.0) and last[5] == (0.5, 0.5)  # all visited once: the best; then the less visited
    for result in (small, large):
        tree = result["tree"]
        assert tree["visits"] == 6 and tree["best"] == 0.9 == result["best"]["reward"]
        for node, depth in _tree_nodes(tree):
            if node["children"]:
                own = 0 if depth == 0 else 1  # a node's first visit is the rollout from it
                assert node["visits"] == own + sum(c["visits"] for c in node["children"])
                assert node["best"] >= max(c["best"] for c in node["children"])
    assert small["evaluations"] == 3  # a schedule seen before is not evaluated again


def test_mcts_finds_the_optimum_of_a_synthetic_reward_within_its_budget():
    """Five experiences (1 · 3 · 10 · 35 = 1050 schedules), a reward that is largest at one schedule: MCTS with 150
    rollouts finds it for every seed; the trace and the best schedule agree."""
    target = [[1.0], [0.0, 1.0], [1 / 3, 0.0, 2 / 3], [0.25, 0.25, 0.0, 0.5]]

    def reward(schedule):
        return 1 - sum(abs(a - b) for x, y in zip(schedule, target, strict=True)
                       for a, b in zip(x, y, strict=True)) / 8

    for seed in range(5):
        result = mcts(5, 150, reward, c=0.1, seed=seed)
        assert result["best"]["schedule"] == target and result["best"]["reward"] == 1.0, seed
        assert [e["best_reward"] for e in result["trace"]][-1] == 1.0 and len(result["trace"]) == 150
        assert result["evaluations"] == len({json.dumps(e["schedule"]) for e in result["trace"]})
        assert result == mcts(5, 150, reward, c=0.1, seed=seed)  # a pure function of the seed
    json.dumps(result)
    base = random_search(5, 150, reward, seed=0)
    assert base["evaluations"] <= 150 and base["best"]["reward"] <= 1.0
    assert search(5, 3, reward, method="ets")["best"]["schedule"] == equal_task_schedule(5)
    with pytest.raises(ConfigError, match="method 'bfs' is not one of"):
        search(5, 3, reward, method="bfs")


# ---------------------------------------------------------------- a search that trains


def _config(tmp_path, name="search", **params):
    return ContinualConfig.model_validate({
        "seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": "class"}},
        "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "strategies": [{"name": "replay_schedule", "params": {"memory": 40, **params}}],
        "output": {"dir": str(tmp_path), "name": name}})


def _first_three(seed):
    full = build_stream("split-digits", {"scenario": "class"}, seed)
    return Stream("split-digits-3", "class", full.experiences[:3], full.info)


def test_a_search_on_split_digits_scores_on_validation_and_reuses_what_it_trained(tmp_path):
    """Three experiences of split-digits, budget 4: three distinct schedules trained (one revisited); each reward is
    the mean validation accuracy of the final model (recomputed here from its saved weights); a schedule's run that
    started from another's saved experiences ends bit-identical to a run of it from scratch; a second search in the
    same directory trains nothing; another configuration there is refused."""
    cfg = _config(tmp_path)
    result = search_schedule(cfg, 4, stream=_first_three)
    assert len(result["trace"]) == 4 and result["evaluations"] == 3
    assert {json.dumps(e["schedule"][1]) for e in result["trace"]} == {"[1.0, 0.0]", "[0.0, 1.0]", "[0.5, 0.5]"}
    json.dumps(result)
    val = validation_stream(_first_three(0))
    assert all(e.suite.splits["test"] is e.suite.splits["val"] for e in val.experiences)
    runs = Path(result["directory"]) / "runs"
    for entry in result["trace"]:
        saved = checkpoint.load(runs / entry["run"] / "e2" / "end.safetensors")
        model = build_model(val.tasks, val.input_shape, "mlp", {"hidden": [32]}, "hard", {})
        model.load_state_dict(saved["model"])
        scores = [experience_score(model, e.suite, 256) for e in val.experiences]
        assert entry["reward"] == pytest.approx(sum(scores) / 3, abs=1e-6)
    best = result["best"]
    assert best["reward"] == max(e["reward"] for e in result["trace"])
    later = [e for e in result["trace"] if e["new"]][-1]  # its e0 and e1 came from the first run
    assert (runs / later["run"] / "e1" / "done.json").stat().st_ino == \
        (runs / result["trace"][0]["run"] / "e1" / "done.json").stat().st_ino
    straight = ContinualConfig.model_validate({**cfg.model_dump(mode="json"), "strategies": [
        {"name": "replay_schedule", "params": {"memory": 40, "schedule": later["schedule"]}}],
        "output": {"dir": str(tmp_path), "name": "straight"}})
    run_dir, _ = continual(straight, stream=val)
    assert (run_dir / "jobs/replay_schedule-s0/e2/end.safetensors").read_bytes() == \
        (runs / later["run"] / "e2" / "end.safetensors").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in runs.glob("*/e*/end.safetensors")}
    again = search_schedule(cfg, 4, stream=_first_three)
    assert again["trace"] == result["trace"]
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/e*/end.safetensors")} == mtimes
    with pytest.raises(ConfigError, match="holds a schedule search of another configuration"):
        search_schedule(_config(tmp_path, memory=20), 2, stream=_first_three)


def test_the_cli_searches_a_schedule(tmp_path):
    cfg = _config(tmp_path, name="cli").model_dump(mode="json")
    cfg["stream"]["params"]["classes_per_experience"] = 5  # two experiences: one schedule
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "polytask.cli", "continual", str(path), "--search-schedule", "2",
                          "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "best schedule (validation reward" in out.stdout and "[[1.0]]" in out.stdout
    saved = json.loads((tmp_path / "cli-schedule-search" / "search-mcts.json").read_text())
    assert saved["best"]["schedule"] == [[1.0]] and len(saved["trace"]) == 2 and saved["evaluations"] == 1
