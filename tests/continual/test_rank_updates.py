"""Incremental rank updates: earlier tasks' outputs exactly unchanged, the documented parameter growth, the reference
code's initialisation, the MultiTaskModel interface under aggregators, and the errors for what it does not support."""

import numpy as np
import pytest
import torch

from polytask.continual import Experience, Stream, build_strategy, build_stream
from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.rank_updates import RankUpdateModel, experience_numel, slot_ranks
from polytask.engine import checkpoint
from polytask.errors import ConfigError
from polytask.flows.continual import continual
from polytask.models import build_model
from polytask.tasks import build_suite


def wrapped(stream, seed=0, hidden=(32,), **params):
    """The rank-update model of ``stream`` (an MLP with ``hidden`` widths) and its strategy."""
    strategy = build_strategy("rank_updates", params, "test")
    strategy.seed = seed
    base = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": list(hidden)})
    return strategy.wrap(base, stream), strategy


def flow_config(tmp_path, scenario="task", epochs=3, optimizer=None, **extra):
    return {"seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": scenario}},
            "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
            "train": {"epochs": epochs, "batch_size": 32, "checkpoint_every": 0,
                      "checkpoint_interval_s": 0, "threads": 1,
                      "optimizer": optimizer or {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}},
            "strategies": ["rank_updates"], "output": {"dir": str(tmp_path), "name": "run"}, **extra}


def ends(run_dir, n):
    """The model state after each of the ``n`` experiences (the flow's ``end.safetensors``)."""
    return [checkpoint.load(run_dir / "jobs" / "rank_updates-s0" / f"e{i}" / "end.safetensors")["model"]
            for i in range(n)]


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
                                       {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}], ids=["sgd", "adamw"])
def test_earlier_tasks_keep_their_outputs_and_weights_bit_for_bit(tmp_path, optimizer):
    """Split-digits, task-incremental, through the flow (a fresh optimiser per experience, weight decay on): after
    every later experience each earlier task's test outputs and its weights are exactly what they were, so its
    accuracy never moves (zero forgetting), while each experience learns its own task."""
    torch.set_num_threads(1)
    run_dir, summary = continual(ContinualConfig.model_validate(flow_config(tmp_path, optimizer=optimizer)))
    (result,) = summary["results"]["rank_updates"]
    r = np.asarray(result["accuracy"])
    assert result["metrics"]["forgetting"] == 0.0 and result["metrics"]["bwt"] == 0.0
    for j in range(5):
        assert np.all(r[j:, j] == r[j, j])  # column j is constant from experience j on
    assert r.diagonal().mean() > 0.9, r

    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    model, _ = wrapped(stream)
    model.eval()
    states = ends(run_dir, 5)
    x = {e.name: e.suite.splits["test"][0].x for e in stream.experiences}
    outputs = []
    for state in states:
        model.load_state_dict(state)
        with torch.no_grad():
            outputs.append({t: model(x[t], [t])[t] for t in model.task_names})
    for i in range(5):
        mine = {n for n, _ in _named(model, i)}
        assert mine, i
        for j in range(i + 1, 5):
            t = stream.experiences[i].name
            assert torch.equal(outputs[j][t], outputs[i][t]), (i, j)
            assert all(torch.equal(states[j][n], states[i][n]) for n in mine), (i, j)
        if i:  # experience i trained its own factors
            assert not torch.equal(states[i][f"layers.0.U.{i}"], states[i - 1][f"layers.0.U.{i}"])


def _named(model, index):
    """Names of experience ``index``'s parameters: its encoder part and its tasks' heads."""
    own = {id(p) for p in model.experience_parameters(index)}
    own |= {id(p) for t, k in model.index.items() if model.task_slot[k] == index for p in model.heads[t].parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in own]


def test_each_experience_adds_the_documented_parameters_and_only_those_train():
    """Per layer (in, out), experience e adds rank_e (in + out) factor entries and, per task, a selector over the
    R_e columns so far and a bias; exactly those (and the task's head) train; the shapes never change."""
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    model, strategy = wrapped(stream, hidden=(32, 16), first_rank=3, rank=2)
    shapes = {n: v.shape for n, v in model.state_dict().items()}
    head = 16 * 2 + 2
    assert model.live_numel() == 0
    before = 0
    for i in range(5):
        strategy.begin(stream, i)
        by_hand = 3 * (64 + 32) + 3 * (32 + 16) + (3 + 32) + (3 + 16) if i == 0 else \
            2 * (64 + 32) + 2 * (32 + 16) + (3 + 2 * i + 32) + (3 + 2 * i + 16)
        assert experience_numel([(64, 32), (32, 16)], slot_ranks(5, 3, 2), i, 1) == by_hand
        encoder = [p for p in model.shared_parameters()]
        assert sum(p.numel() for p in encoder) == by_hand
        assert {id(p) for p in encoder} == {id(p) for p in model.experience_parameters(i)}
        t = stream.experiences[i].name
        assert [id(p) for p in model.task_parameters(t)] == [id(p) for p in model.heads[t].parameters()]
        assert all(not list(model.task_parameters(o)) for o in model.task_names if o != t)
        assert model.live_numel() - before == by_hand + head
        before = model.live_numel()
        assert {n: v.shape for n, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == before  # everything was allocated from the start


def test_initial_selectors_and_factors_follow_the_reference_code_and_the_seed():
    """A new task's selector is zero on earlier factors and one on its own; factor blocks have orthonormal columns
    and are a pure function of the run's seed."""
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    model, _ = wrapped(stream, first_rank=4, rank=2)
    (layer,) = model.rank_layers()
    for k in range(5):
        want = torch.tensor([1.0] * 4) if k == 0 else torch.tensor([0.0] * (4 + 2 * (k - 1)) + [1.0, 1.0])
        assert torch.equal(layer.s[k].detach(), want) and not layer.b[k].any()
    for block in [*layer.U, *layer.V]:
        assert torch.allclose(block.T @ block, torch.eye(block.shape[1]), atol=1e-5)
    same, _ = wrapped(stream, first_rank=4, rank=2)
    other, _ = wrapped(stream, seed=1, first_rank=4, rank=2)
    mine, twin = model.state_dict(), same.state_dict()
    assert all(torch.equal(v, twin[n]) for n, v in mine.items() if n.startswith("layers."))  # heads: the base's
    assert not torch.equal(model.rank_layers()[0].U[0], other.rank_layers()[0].U[0])
    x = stream.experiences[2].suite.splits["test"][0].x
    dense = x @ layer.weight(2).T + layer.b[2]
    assert torch.allclose(layer(x, 2), dense, atol=1e-5)


@pytest.mark.parametrize("grad_mode", ["params", "representation"])
def test_two_tasks_per_experience_under_an_aggregator(tmp_path, grad_mode):
    """Two regression tasks per experience trained by UPGrad: per-task features feed the heads as ``forward`` does,
    the engine's per-task gradients work in both modes, and the first experience's outputs survive the second."""
    suite = build_suite("synthetic", {"d": 6, "groups": [2, 2], "n_train": 48, "n_val": 16, "n_test": 16}, seed=0)
    names = suite.task_names[:4]
    stream = Stream("pairs", "task", (Experience("a", suite.subset(names[:2])),
                                      Experience("b", suite.subset(names[2:]))))
    model, _ = wrapped(stream)
    x = suite.splits["test"][0].x
    assert model.reads(names[3]) == [3]
    with torch.no_grad():
        via = model.outputs(model.features(x))
        assert all(torch.equal(via[t], o) for t, o in model(x).items())
    cfg = flow_config(tmp_path, epochs=2, method={"name": "upgrad", "grad_mode": grad_mode},
                      optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    run_dir, _ = continual(ContinualConfig.model_validate(cfg), stream=stream)
    first, second = ends(run_dir, 2)
    model.eval()
    with torch.no_grad():
        model.load_state_dict(first)
        before = model(x, names[:2])
        model.load_state_dict(second)
        after = model(x, names)
    assert all(torch.equal(before[t], after[t]) for t in names[:2])
    assert not torch.equal(first["layers.0.U.1"], second["layers.0.U.1"])


def test_what_it_does_not_support_is_refused_by_name(tmp_path):
    for scenario in ("class", "domain"):
        with pytest.raises(ConfigError, match=f"{scenario}-incremental stream.*task id"):
            continual(ContinualConfig.model_validate(flow_config(tmp_path / scenario, scenario=scenario)))
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    strategy = build_strategy("rank_updates", {}, "test")
    lenet = build_model(stream.tasks, (1, 8, 8), "lenet", {"channels": [2], "hidden": 8})
    with pytest.raises(ConfigError, match=r"layer '0' is a Conv2d"):
        strategy.wrap(lenet, stream)

    class Plain(torch.nn.Module):
        pass

    with pytest.raises(ConfigError, match="model is a Plain"):
        strategy.wrap(Plain(), stream)
    bare = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": []})
    with pytest.raises(ConfigError, match=r"no nn\.Linear layer"):
        strategy.wrap(bare, stream)
    first = stream.experiences[0]
    twice = Stream("twice", "task", (first, Experience("again", first.suite)))
    with pytest.raises(ConfigError, match="task 'e0' is trained by experiences 'e0' and 'again'"):
        strategy.check(twice, "rank_updates")
    with pytest.raises(ConfigError, match="first_rank"):
        build_strategy("rank_updates", {"first_rank": 0}, "strategies.0.params")
    model, strategy = wrapped(stream)
    assert isinstance(model, RankUpdateModel)

    class Run:
        model = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [8]})

    with pytest.raises(ConfigError, match="not the model the strategy's wrap built"):
        strategy.init(Run())
