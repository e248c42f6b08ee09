"""The step function: aggregator paths agree with plain autograd on cases with known answers, and every
registered aggregator, run through the training step on nearly dependent float32 gradients, gives the direction
computed from the exact (float64) Gramian."""

from dataclasses import replace
from typing import ClassVar

import pytest
import torch
from torch import nn

from helpers import assert_is_float64_direction
from polytask.aggregators.base import Aggregator, stateless
from polytask.config import MethodConfig
from polytask.engine.loop import task_losses
from polytask.engine.step import Method, build_method, train_step
from polytask.jacobian import gramian
from polytask.methods import load_all
from polytask.models import MultiTaskModel, build_model
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

AGGREGATORS = sorted(e.name for e in load_all() if e.extra.get("kind") == "aggregator")

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


class GivenGradients(MultiTaskModel):
    """A model whose per-task gradients are the rows of a given J: in params mode the losses are L_k = J_k . theta
    (``linear_losses``); in representation mode the representation is z = theta and task k predicts z . J_k
    with a squared error against -1/2, so at theta = 0 dL_k/dz = J_k."""

    def __init__(self, j: torch.Tensor, representation: bool):
        super().__init__()
        self.j = j
        self.theta = nn.Parameter(torch.zeros(j.shape[1], dtype=j.dtype))
        self.representation = representation

    def features(self, x):
        return [self.theta[None].expand(len(x), -1)] if self.representation else None

    def outputs(self, features, names):
        return {n: features[0] @ self.j[int(n[1:])] for n in names}

    def shared_parameters(self):
        return iter([self.theta])

    def task_parameters(self, name):
        return iter([])


def linear_losses(model, sources, rows, tasks):
    return model.j @ model.theta


def nearly_dependent(seed=0, k=5, p=1000):
    """The issue's case: rank 2 plus 1e-4 noise, in float32 (as a float32 model's backward gives it)."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 2, generator=g) @ torch.randn(2, p, generator=g) + 1e-4 * torch.randn(k, p, generator=g)
    return j.float()


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_engine_direction_on_nearly_dependent_float32_gradients_is_the_float64_one(mode):
    # before: the step multiplied float32 blocks in float32, which rounds away the small eigenvalues of G that
    # decide these methods: cosines 0.61 (IMTL-G), 0.80 (MGDA), 0.87 (Nash-MTL), 0.98 (UPGrad) to the exact
    # direction, and ConFIG an all-zero update
    j = nearly_dependent()
    k = j.shape[0]
    tasks = [Task(f"t{i}", "regression", 1) for i in range(k)]
    names = [t.name for t in tasks]
    src = [TaskData(torch.zeros(1, 1), {n: torch.full((1,), -0.5) for n in names})]
    losses = torch.zeros(k) if mode == "params" else torch.full((k,), 0.25)
    j64 = j.double()
    for name in AGGREGATORS:
        model = GivenGradients(j, mode == "representation")
        method = build_method(MethodConfig(name=name, grad_mode=mode), names)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ctx = StepContext(0, 0, generator=torch.Generator().manual_seed(0))
        train_step(model, method, method.init(), src, [torch.arange(1)], tasks, opt, ctx, linear_losses)
        d = model.theta.grad.double()
        # the reference: the same method on the exact Gramian of the same float32 gradients, combined in float64
        ref_ctx = replace(ctx, losses=losses, generator=torch.Generator().manual_seed(0), grad_dtype=j.dtype)
        assert_is_float64_direction(d, j64, name, names, ref_ctx, (name, mode))


def test_gramian_is_float64_whatever_the_blocks_dtype():
    j = nearly_dependent()
    blocks = [j[:, :300], j[:, 300:].reshape(5, 7, 100)]
    j64 = j.double()
    g = gramian(blocks)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, j64 @ j64.T, rtol=1e-13, atol=0)


class TwoTowers(MultiTaskModel):
    """Two shared features: task a reads the first, task b both, task c the second (``reads``), so the per-task
    feature gradients of a task are zero on the features it does not read."""

    READS: ClassVar = {"a": [0], "b": [0, 1], "c": [1]}

    def __init__(self):
        super().__init__()
        self.task_names = [t.name for t in TASKS]
        self.towers = nn.ModuleList([nn.Sequential(nn.Linear(6, 4), nn.Tanh()) for _ in range(2)])
        self.heads = nn.ModuleDict({t.name: nn.Linear(4 * len(self.READS[t.name]), t.n_outputs) for t in TASKS})

    def features(self, x):
        return [tower(x) for tower in self.towers]

    def reads(self, task):
        return self.READS[task]

    def outputs(self, features, tasks=None):
        return {t: self.heads[t](torch.cat([features[j] for j in self.READS[t]], 1)) for t in tasks or self.task_names}

    def forward(self, x, tasks=None):
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self):
        return iter(self.towers.parameters())

    def task_parameters(self, task):
        return iter(self.heads[task].parameters())


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_an_architecture_says_which_features_each_task_reads(mode):
    """Per-task gradients come from the features each task reads: the blocks are the true per-task gradients (zero
    where a task reads nothing), and a summing aggregator gives the summed loss's gradients in either mode."""
    from polytask.engine.step import masked_loss, parameter_grads, representation_grads

    _, src, rows = setup()
    torch.manual_seed(1)
    model = TwoTowers()
    tg = representation_grads(model, src, rows, TASKS)
    feats = model.features(src[0].x)
    out = model.outputs(feats)
    losses = torch.stack([masked_loss(t, out[t.name], src[0].y[t.name]) for t in TASKS])
    for k, t in enumerate(TASKS):
        want = torch.autograd.grad(losses[k], feats, retain_graph=True, allow_unused=True, materialize_grads=True)
        for j in range(2):
            torch.testing.assert_close(tg.z_blocks[j][k], want[j])
            assert (j in TwoTowers.READS[t.name]) == bool(want[j].abs().sum() > 0)
    _, blocks = parameter_grads(model, src, rows, TASKS, task_losses, 0)
    shared = list(model.shared_parameters())
    for k in range(len(TASKS)):
        want = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True, materialize_grads=True)
        for b, w in zip(blocks, want, strict=True):
            torch.testing.assert_close(b[k], w)

    summed = agg(lambda g: torch.ones(g.shape[0], dtype=g.dtype), mode=mode)
    train_step(model, summed, summed.init(), src, rows, TASKS, torch.optim.SGD(model.parameters(), lr=0.0),
               StepContext(0, 0), task_losses)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    task_losses(model, src, rows, TASKS).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_representation_mode_without_shared_features_is_refused():
    from polytask.errors import ConfigError

    model = GivenGradients(torch.randn(3, 4), representation=False)
    method = agg(lambda g: torch.ones(g.shape[0], dtype=g.dtype), mode="representation")
    src = [TaskData(torch.zeros(2, 1), {t: torch.zeros(2) for t in ("t0", "t1", "t2")})]
    tasks = [Task(f"t{i}", "regression", 1) for i in range(3)]
    with pytest.raises(ConfigError, match="shared features"):
        train_step(model, method, method.init(), src, [torch.arange(2)], tasks,
                   torch.optim.SGD(model.parameters(), lr=0.0), StepContext(0, 0), linear_losses)


@pytest.mark.parametrize("method", ["equal", "upgrad"])
def test_an_architectures_aux_loss_is_added_after_the_method(method):
    """``aux_loss()`` (e.g. a load-balancing term) adds its gradient to whatever the method set, in both kinds."""
    model, src, rows = setup()
    m = build_method(MethodConfig(name=method), [t.name for t in TASKS])
    train_step(model, m, m.init(), src, rows, TASKS, torch.optim.SGD(model.parameters(), lr=0.0), StepContext(0, 0),
               task_losses)
    without = {n: p.grad.clone() for n, p in model.named_parameters()}
    first = next(model.encoder.parameters())
    model.aux_loss = lambda: (first ** 2).sum() * 0.5  # gradient: the weight itself
    train_step(model, m, m.init(), src, rows, TASKS, torch.optim.SGD(model.parameters(), lr=0.0), StepContext(0, 0),
               task_losses)
    for n, p in model.named_parameters():
        want = without[n] + (first.detach() if p is first else 0)
        torch.testing.assert_close(p.grad, want, msg=n)


def test_zero_grad_clears_as_torch_does_and_keeps_an_optimisers_own():
    """The engine's ``zero_grad``: every gradient None, as ``Optimizer.zero_grad(set_to_none=True)`` leaves them; an
    optimiser class with its own ``zero_grad`` gets it called."""
    from polytask.engine.step import zero_grad

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    zero_grad(opt)
    assert all(p.grad is None for p in model.parameters())

    calls = []

    class Own(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append(set_to_none)

    zero_grad(Own(model.parameters(), lr=0.1))
    assert calls == [True]
