"""The shared suite every registered architecture runs (issue 11): outputs per task, a partition of the parameters
into shared and per-task sets that matches where gradients really flow, shared features consistent with the
forward (so representation-mode aggregation is exact), every architecture x gradient mode with a few joint
methods, and exact resume through the engine's checkpoint format.

An architecture that needs another backbone or input than the default (an MLP on 6 features) says so in
``SETUPS``; ``PARAMS`` gives small parameters where the defaults are large."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import pytest
import torch
from torch import nn

from helpers import assert_summing_aggregator_gives_summed_loss
from polytask.config import MethodConfig
from polytask.engine import checkpoint
from polytask.engine.loop import task_losses
from polytask.engine.step import Method, build_method, train_step
from polytask.errors import ConfigError
from polytask.methods import load_all
from polytask.models import ARCHITECTURES, BACKBONES, MultiTaskModel, build_model
from polytask.models.backbones import _mlp_layers
from polytask.models.sharing import make_head
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

load_all()
NAMES = ARCHITECTURES.names()
TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]

# name -> (backbone, backbone params, input shape); default: an MLP on 6 features
SETUPS: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "mtan": ("lenet", {"channels": [4, 6], "hidden": 8}, (1, 8, 8)),
}
DEFAULT_SETUP = ("mlp", {"hidden": [8, 5]}, (6,))
# name -> small architecture params (the defaults are sized for real data)
PARAMS: dict[str, dict[str, Any]] = {
    "ple": {"levels": 3, "expert_hidden": [16]},  # three levels: the lower levels' experts read stacked inputs
}
# joint methods run on every architecture, each in the gradient modes listed
JOINT = [("equal", "params"), ("famo", "params"), ("upgrad", "params"), ("upgrad", "representation"),
         ("pcgrad", "representation")]


def build(name: str, seed: int = 0) -> MultiTaskModel:
    backbone, bparams, shape = SETUPS.get(name, DEFAULT_SETUP)
    torch.manual_seed(seed)
    return build_model(TASKS, shape, backbone, bparams, name, PARAMS.get(name, {}))


def data(name: str, n: int = 24, seed: int = 0) -> tuple[list[TaskData], list[torch.Tensor]]:
    shape = SETUPS.get(name, DEFAULT_SETUP)[2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = {"a": torch.randint(0, 3, (n,), generator=g).float(), "b": torch.randn(n, generator=g),
         "c": torch.randint(0, 2, (n,), generator=g).float()}
    y["c"][:5] = float("nan")
    return [TaskData(x, y)], [torch.arange(n)]


def trainable(model: MultiTaskModel) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def test_every_architecture_is_covered_and_documented():
    assert {"hard"} <= set(NAMES)
    for name in NAMES:
        entry = ARCHITECTURES.get(name)
        assert entry.summary and entry.paper, f"{name}: registered without a summary or paper"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_one_tensor_per_task(name):
    model = build(name).eval()
    src, _ = data(name)
    out = model(src[0].x)
    assert list(out) == [t.name for t in TASKS]
    for t in TASKS:
        assert out[t.name].shape == (24, t.n_outputs), (t.name, out[t.name].shape)
        assert torch.isfinite(out[t.name]).all()
    some = model(src[0].x, ["c", "a"])
    assert set(some) == {"a", "c"}
    for t in ("a", "c"):
        torch.testing.assert_close(some[t], out[t], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_partitioned_into_shared_and_per_task(name):
    model = build(name)
    every = trainable(model)
    seen: dict[int, str] = {}
    for part, params in [("shared", model.shared_parameters())] + [(t.name, model.task_parameters(t.name))
                                                                    for t in TASKS]:
        for p in params:
            assert id(p) in every, f"{name}: {part} lists a parameter that does not train"
            assert id(p) not in seen, f"{name}: {every[id(p)]} is in {seen[id(p)]} and in {part}"
            seen[id(p)] = part
    assert set(seen) == set(every), f"{name}: in no set: {sorted(every[i] for i in set(every) - set(seen))}"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_parameters_a_task_uses(name):
    """Task t's loss reaches every one of t's own parameters and none of another task's; the summed loss reaches
    every shared parameter."""
    model = build(name)
    src, _ = data(name)
    out = model(src[0].x)
    g = torch.Generator().manual_seed(1)
    losses = {t.name: (out[t.name] * torch.randn(out[t.name].shape, generator=g)).sum() for t in TASKS}
    own = {t.name: list(model.task_parameters(t.name)) for t in TASKS}
    names = trainable(model)
    for t in TASKS:
        grads = torch.autograd.grad(losses[t.name], [p for ps in own.values() for p in ps], retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        it = iter(grads)
        for u, ps in own.items():
            for p in ps:
                nz = bool(next(it).abs().sum() > 0)
                assert nz == (u == t.name), f"{name}: loss of {t.name} -> {names[id(p)]} (a parameter of {u}): {nz}"
    shared = list(model.shared_parameters())
    grads = torch.autograd.grad(sum(losses.values()), shared, allow_unused=True, materialize_grads=True)
    for p, gr in zip(shared, grads, strict=True):
        assert gr.abs().sum() > 0, f"{name}: no task's loss reaches the shared parameter {names[id(p)]}"


@pytest.mark.parametrize("name", NAMES)
def test_shared_features_give_the_forward(name):
    """``outputs(features(x))`` is the forward exactly, and every task reads valid features."""
    model = build(name).eval()
    src, _ = data(name)
    feats = model.features(src[0].x)
    assert feats is not None, f"{name}: no shared features (representation mode would be refused)"
    torch.testing.assert_close(model.outputs(feats), model(src[0].x), rtol=0, atol=0)
    read = set()
    for t in TASKS:
        r = model.reads(t.name)
        r = range(len(feats)) if r is None else r
        assert all(0 <= j < len(feats) for j in r)
        read |= set(r)
    assert read == set(range(len(feats))), f"{name}: features no task reads: {set(range(len(feats))) - read}"


@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("name", NAMES)
def test_a_summing_aggregator_gives_the_summed_loss_gradient(name, mode):
    """The per-task gradients (parameter Jacobian, or feature blocks pushed back) are exact: summing them gives
    the gradient of the summed loss, in both modes."""
    src, rows = data(name)
    assert_summing_aggregator_gives_summed_loss(build(name), src, rows, TASKS, mode)


@pytest.mark.parametrize(("method", "mode"), JOINT)
@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_trains_with_joint_methods(name, method, mode):
    model = build(name)
    src, rows = data(name)
    m = build_method(MethodConfig(name=method, grad_mode=mode), [t.name for t in TASKS])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = m.init()
    for i in range(3):
        losses, _, state = train_step(model, m, state, src, rows, TASKS, opt,
                                      StepContext(i, 0, None, lambda: task_losses(model, src, rows, TASKS), 3,
                                                  torch.Generator().manual_seed(i)), task_losses)
        assert torch.isfinite(losses).all()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{name}: {n} did not move under {method}/{mode}"


def _steps(model: MultiTaskModel, opt: torch.optim.Optimizer, method: Method, state: Any, name: str,
           start: int, stop: int) -> Any:
    src, rows = data(name)
    for i in range(start, stop):
        _, _, state = train_step(model, method, state, src, rows, TASKS, opt, StepContext(i, 0), task_losses)
    return state


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_resumes_exactly(name, tmp_path):
    """Three steps, a checkpoint in the engine's format, a fresh model built from another seed loads it, three more
    steps: the same bytes as six steps straight (all state is in ``state_dict``, and nothing else is drawn)."""
    method = build_method(MethodConfig(name="upgrad", grad_mode="representation"), [t.name for t in TASKS])

    def fresh(seed):
        model = build(name, seed)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, opt = fresh(0)
    _steps(model, opt, method, method.init(), name, 0, 6)
    want = checkpoint.dumps({"model": model.state_dict()})

    model, opt = fresh(0)
    state = _steps(model, opt, method, method.init(), name, 0, 3)
    checkpoint.save(tmp_path / "ckpt.safetensors", {"model": model.state_dict(), "opt": opt.state_dict()})
    model, opt = fresh(1)
    tree = checkpoint.load(tmp_path / "ckpt.safetensors")
    model.load_state_dict(tree["model"])
    opt.load_state_dict(tree["opt"])
    _steps(model, opt, method, state, name, 3, 6)
    assert checkpoint.dumps({"model": model.state_dict()}) == want


@pytest.mark.parametrize("name", NAMES)
def test_unknown_architecture_params_are_refused_by_name(name):
    backbone, bparams, shape = SETUPS.get(name, DEFAULT_SETUP)
    with pytest.raises(ConfigError, match=r"model\.architecture_params"):
        build_model(TASKS, shape, backbone, bparams, name, {"no_such_option": 1})


def _layout_0_1_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build models as polytask 0.1.0 did: every head an ``nn.Sequential`` (around its one ``Linear`` when it has no
    hidden layer), and the mlp backbone starting with a ``Flatten`` on vectors too."""
    def head(task: Task, in_dim: int) -> nn.Module:
        last = task.head.hidden[-1] if task.head.hidden else in_dim
        return nn.Sequential(*_mlp_layers(in_dim, list(task.head.hidden), 0.0), nn.Linear(last, task.n_outputs))

    def mlp(params: Any, shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        width = math.prod(shape)
        return nn.Sequential(nn.Flatten(), *_mlp_layers(width, params.hidden, params.dropout)), params.hidden[-1]

    present = make_head  # this module's own name is patched too, on the way
    for module in list(sys.modules.values()):
        if getattr(module, "make_head", None) is present:
            monkeypatch.setattr(module, "make_head", head)
    monkeypatch.setitem(BACKBONES._entries, "mlp", dataclasses.replace(BACKBONES.get("mlp"), build=mlp))


@pytest.mark.parametrize("name", NAMES)
def test_weights_saved_in_the_0_1_0_layout_load_under_the_present_names(name, monkeypatch):
    """A state dict of 0.1.0's layout (real: built by its code) loads into the present model, which then computes
    what the old one did; the names did change (a head without hidden layers is its ``Linear``, the mlp numbers its
    layers from 0 on vectors)."""
    with monkeypatch.context() as m:
        _layout_0_1_0(m)
        old = build(name, 0).eval()
    new = build(name, 1).eval()
    saved = old.state_dict()
    assert set(saved) != set(new.state_dict())
    new.load_state_dict(saved)
    (src,), _ = data(name)
    with torch.no_grad():
        want, got = old(src.x), new(src.x)
    for t in want:
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=0)


def test_a_state_dict_that_matches_under_no_name_is_still_refused():
    model = build("hard")
    saved = {k.replace("heads.", "towers."): v for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"Missing key.*heads\.a\.weight"):
        model.load_state_dict(saved)
