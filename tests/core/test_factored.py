"""Representation mode with linear heads (``polytask.jacobian.Factored``): task k's feature gradient kept as
(dL_k/d output_k, W_k). The Gramian is the exact float64 one of the rows δ_k W_k, the update and the stacked rows are
the dense ones, and the engine's step gives what the dense path (per-task leaf copies of the feature) gives: the same
head gradients, the same direction into the encoder, on nearly dependent gradients the float64 direction of every
aggregator."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_is_float64_direction
from polytask.config import MethodConfig
from polytask.engine.step import accumulated_step, build_method, representation_grads, train_step
from polytask.jacobian import Factored, Rows, combine, dense, gramian
from polytask.methods import load_all
from polytask.models import MultiTaskModel, build_model
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

AGGREGATORS = sorted(e.name for e in load_all() if e.extra.get("kind") == "aggregator")


@settings(max_examples=40, deadline=None)
@given(outs=st.lists(st.integers(1, 6), min_size=1, max_size=5), lead=st.lists(st.integers(1, 7), min_size=1,
       max_size=2), d=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_factored_gramian_update_and_rows_are_those_of_the_rows(outs, lead, d, seed):
    """Any number of tasks and outputs, any leading shape: G is the exact float64 Gramian of the rows δ_k W_k (their
    products formed in float64), J^T w and the stacked rows are the dense ones."""
    gen = torch.Generator().manual_seed(seed)
    deltas = tuple(torch.randn(*lead, o, generator=gen) * 10 ** float(torch.randint(-3, 4, (1,), generator=gen))
                   for o in outs)
    maps = tuple(torch.randn(o, d, generator=gen) for o in outs)
    block = Factored(deltas, maps)
    k = len(outs)
    exact = torch.stack([(x.double() @ m.double()).reshape(-1) for x, m in zip(deltas, maps, strict=True)])
    torch.testing.assert_close(gramian([block]), exact @ exact.T, rtol=1e-12, atol=1e-300)
    w = torch.randn(k, generator=gen, dtype=torch.float64)
    (got,) = combine(w, [block])
    assert got.dtype == torch.float32 and got.shape == (*lead, d) == block.row_shape
    want = (w @ exact).reshape(*lead, d)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max() + 1e-30))
    torch.testing.assert_close(dense(block).double(), exact.reshape(k, *lead, d), rtol=1e-5,
                               atol=1e-6 * float(exact.abs().max() + 1e-30))


def _suite(k=4, n=24, seed=0):
    """Classification and regression tasks, one label missing (masked rows give zero rows of δ)."""
    gen = torch.Generator().manual_seed(seed)
    tasks = [Task(f"c{i}", "classification", 3 + i) for i in range(k - 1)] + [Task("r", "regression", 2)]
    y = {t.name: torch.randint(0, t.n_outputs, (n,), generator=gen).float() for t in tasks[:-1]}
    y["r"] = torch.randn(n, 2, generator=gen)
    y["c0"][5] = float("nan")
    return tasks, TaskData(torch.randn(n, 7, generator=gen), y)


def _dense(model, monkeypatch):
    """The model with its linear heads hidden from the engine: the dense (leaf-copy) path."""
    monkeypatch.setattr(type(model), "linear_head", lambda self, task: None)


def _both_ways(name, n_micro, monkeypatch, n=24):
    """One representation-mode step of ``name`` over ``n_micro`` micro-batches, with the factored rows and with the
    dense rows (the heads hidden from the engine): the parameter gradients of both must agree."""
    tasks, src = _suite(n=n)
    rows = torch.arange(len(src))
    grads = {}
    for path in ("factored", "dense"):
        torch.manual_seed(0)
        model = build_model(tasks, (7,), "mlp", {"hidden": [16, 8]})
        with monkeypatch.context() as m:
            if path == "dense":
                _dense(model, m)
            tg = representation_grads(model, [src], [rows], tasks)
            assert isinstance(tg.z_rows[0], Factored if path == "factored" else Rows)
            method = build_method(MethodConfig(name=name, grad_mode="representation"), [t.name for t in tasks])
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            ctx = StepContext(0, 0, generator=torch.Generator().manual_seed(0))
            losses, _, _ = accumulated_step(model, method, method.init(), [([src], [r]) for r in rows.chunk(n_micro)],
                                            tasks, opt, ctx, None)
        grads[path] = [p.grad.clone() for p in model.parameters()]
        assert torch.isfinite(losses).all()
    for a, b in zip(grads["factored"], grads["dense"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["upgrad", "mgda", "mean", "pcgrad", "cagrad"])
def test_engine_step_with_linear_heads_equals_the_dense_path(name, monkeypatch):
    _both_ways(name, 1, monkeypatch)


class LinearHeadsOnTheta(MultiTaskModel):
    """The representation is a parameter theta (B x D), so the direction the engine pushes into it is theta's
    gradient; task k's output is a linear head on it with given weights W_k (1 output)."""

    def __init__(self, weights: torch.Tensor, b: int):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(b, weights.shape[1], generator=torch.Generator().manual_seed(1)))
        self.heads = nn.ModuleList()
        for w in weights:
            head = nn.Linear(weights.shape[1], 1)
            head.weight.data.copy_(w[None])
            self.heads.append(head)
        self.task_names = [f"t{i}" for i in range(len(weights))]

    def features(self, x):
        return [self.theta[:len(x)] * 1.0]

    def outputs(self, features, names):
        return {n: self.heads[int(n[1:])](features[0]) for n in names}

    def shared_parameters(self):
        return iter([self.theta])

    def task_parameters(self, name):
        return self.heads[int(name[1:])].parameters()

    def linear_head(self, task):
        return self.heads[int(task[1:])]


@pytest.mark.parametrize("name", AGGREGATORS)
def test_engine_direction_with_nearly_dependent_linear_heads_is_the_float64_one(name):
    """Heads of rank 2 plus 1e-4 noise (issue 8 item 2's case, through the factored rows): every aggregator's
    direction is the one computed from the exact float64 Jacobian δ_k W_k."""
    k, b, d = 5, 6, 400
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(k, 2, generator=gen) @ torch.randn(2, d, generator=gen)
         + 1e-4 * torch.randn(k, d, generator=gen)).float()
    model = LinearHeadsOnTheta(w, b)
    tasks = [Task(t, "regression", 1) for t in model.task_names]
    src = TaskData(torch.zeros(b, 1), {t.name: torch.randn(b, generator=gen) for t in tasks})
    rows = torch.arange(b)
    tg = representation_grads(model, [src], [rows], tasks)
    (block,) = tg.z_rows
    assert isinstance(block, Factored)
    j64 = torch.stack([(x.double() @ m.double()).reshape(-1) for x, m in zip(block.deltas, block.maps, strict=True)])
    names = [t.name for t in tasks]
    method = build_method(MethodConfig(name=name, grad_mode="representation"), names)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = StepContext(0, 0, generator=torch.Generator().manual_seed(0))
    losses, _, _ = train_step(model, method, method.init(), [src], [rows], tasks, opt, ctx, None)
    ref_ctx = StepContext(0, 0, losses=losses.double(), generator=torch.Generator().manual_seed(0),
                          grad_dtype=torch.float32)
    assert_is_float64_direction(model.theta.grad.double().reshape(-1), j64, name, names, ref_ctx, name)


def test_a_head_with_a_forward_hook_keeps_the_dense_rows():
    """A hook may change what the head computes, so its rows are no longer δ_k W_k: the dense path is taken."""
    tasks, src = _suite()
    model = build_model(tasks, (7,), "mlp", {"hidden": [8]})
    assert model.linear_head("r") is not None
    handle = model.heads["r"].register_forward_hook(lambda m, i, o: o * 2)
    assert model.linear_head("r") is None
    tg = representation_grads(model, [src], [torch.arange(len(src))], tasks)
    assert isinstance(tg.z_rows[0], Rows)
    handle.remove()
    assert isinstance(representation_grads(model, [src], [torch.arange(len(src))], tasks).z_rows[0], Factored)


def test_accumulated_step_keeps_the_factors_and_equals_the_dense_path(monkeypatch):
    """Gradient accumulation over micro-batches joins their factored rows (each task's output gradients scaled by its
    share of the labels) and gives the update of the dense path."""
    from polytask.engine import step as step_mod

    joined = []
    real = step_mod._joined_rows
    monkeypatch.setattr(step_mod, "_joined_rows", lambda parts: joined.append(real(parts)) or joined[-1])
    _both_ways("upgrad", 3, monkeypatch, n=30)
    assert [type(b) for b in joined] == [Factored, Rows]
