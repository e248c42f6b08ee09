"""The step function: aggregator paths agree with plain autograd on cases with known answers."""

import pytest
import torch

from polytask.aggregators.base import Aggregator, stateless
from polytask.engine.loop import task_losses
from polytask.engine.step import Method, train_step
from polytask.models import build_model
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]


def setup(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [8, 5], "dropout": dropout})
    x = torch.randn(16, 6)
    y = {"a": torch.randint(0, 3, (16,)).float(), "b": torch.randn(16), "c": torch.randint(0, 2, (16,)).float()}
    y["c"][:5] = float("nan")
    return model, [TaskData(x, y)], [torch.arange(16)]


def grads_after(method, w_plain=None, seed=0):
    """Gradients set by train_step (SGD with lr 0 leaves the weights alone)."""
    model, src, rows = setup(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = StepContext(0, 0)
    if method is None:  # plain autograd reference on Σ w_k L_k
        losses = task_losses(model, src, rows, TASKS)
        (w_plain * losses).sum().backward()
    else:
        train_step(model, method, method.init(), src, rows, TASKS, opt, ctx, task_losses)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def agg(fn, input="gramian", **kw):
    return Method("test", "aggregator", stateless(fn, input), **kw)


ONES = agg(lambda g: torch.ones(g.shape[0], dtype=g.dtype))


@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_sum_aggregator_equals_summed_loss(mode, chunk):
    m = agg(lambda g: torch.ones(g.shape[0], dtype=g.dtype), mode=mode, chunk=chunk)
    got, want = grads_after(m), grads_after(None, torch.ones(3))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_weights_scale_shared_part_only(mode):
    w = torch.tensor([0.2, 3.0, 1.5], dtype=torch.float64)
    got = grads_after(agg(lambda g: w, mode=mode))
    shared_ref = grads_after(None, w.float())
    heads_ref = grads_after(None, torch.ones(3))
    for n in got:
        ref = heads_ref if n.startswith("heads.") else shared_ref
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    heads_weighted = grads_after(agg(lambda g: w, mode=mode, weights_heads=True))
    for n in got:
        torch.testing.assert_close(heads_weighted[n], shared_ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_jacobian_input_method(mode):
    m = agg(lambda j: j.sum(0), input="jacobian", mode=mode)
    got, want = grads_after(m), grads_after(None, torch.ones(3))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gramian_is_the_one_of_the_true_jacobian():
    model, src, rows = setup()
    losses = task_losses(model, src, rows, TASKS)
    shared = list(model.shared_parameters())
    rows_j = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[k], shared, retain_graph=True)])
              for k in range(3)]
    j = torch.stack(rows_j).double()
    seen = {}

    def spy(g):
        seen["g"] = g
        return torch.ones(3, dtype=g.dtype)

    grads_after(agg(spy))
    torch.testing.assert_close(seen["g"], j @ j.T)


def test_fmtl_tiny_radius_matches_plain_and_large_radius_differs():
    base = grads_after(ONES)
    tiny = grads_after(agg(lambda g: torch.ones(g.shape[0], dtype=g.dtype), sam_rho=1e-7))
    big = grads_after(agg(lambda g: torch.ones(g.shape[0], dtype=g.dtype), sam_rho=0.5))
    for n in base:
        torch.testing.assert_close(tiny[n], base[n], rtol=1e-3, atol=1e-5)
    assert any((big[n] - base[n]).abs().max() > 1e-3 for n in base)


def test_stateful_aggregator_state_is_threaded():
    def init():
        return {"calls": 0}

    def update(state, g, ctx):
        return torch.ones(g.shape[0], dtype=g.dtype), {"calls": state["calls"] + 1}

    m = Method("count", "aggregator", Aggregator(init, update))
    model, src, rows = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = m.init()
    for _ in range(3):
        _, w, state = train_step(model, m, state, src, rows, TASKS, opt, StepContext(0, 0), task_losses)
    assert state == {"calls": 3} and w.tolist() == [1.0, 1.0, 1.0]
