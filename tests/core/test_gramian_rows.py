"""The float64 Gramian and the update J^T w from per-task gradient rows kept apart (``polytask.jacobian.Rows``):
equal to the exact float64 answer on nearly dependent float32 gradients, through the engine's representation step
with several samples and several upcast chunks, and equal to the stacked-block path they replace."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polytask.jacobian as jac
from helpers import assert_is_float64_direction
from polytask.aggregators.base import stateless
from polytask.config import MethodConfig
from polytask.engine.step import Method, build_method, train_step
from polytask.jacobian import Rows, combine, dense, gramian
from polytask.methods import load_all
from polytask.models import MultiTaskModel
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

AGGREGATORS = sorted(e.name for e in load_all() if e.extra.get("kind") == "aggregator")


def nearly_dependent_rows(k=5, b=4, d=5000, seed=0):
    """K x B x D per-sample gradients of rank 2 plus 1e-4 noise, in float32 (issue 8 item 2's case, per sample)."""
    g = torch.Generator().manual_seed(seed)
    p = b * d
    j = torch.randn(k, 2, generator=g) @ torch.randn(2, p, generator=g) + 1e-4 * torch.randn(k, p, generator=g)
    return j.float().reshape(k, b, d)


class GivenFeatureGradients(MultiTaskModel):
    """Representation z = theta (B x D, shared); task k predicts row b as <z_b, A[k, b]> with a squared error against
    -B/2, so at theta = 0 the per-sample gradient of task k's mean loss is dL_k/dz_b = A[k, b] exactly: the engine's
    feature-gradient rows are the given float32 A, and the gradient pushed into theta is the direction itself."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a
        self.theta = nn.Parameter(torch.zeros(a.shape[1:]))

    def features(self, x):
        return [self.theta[:len(x)] * 1.0]

    def outputs(self, features, names):
        return {n: (features[0] * self.a[int(n[1:])]).sum(1) for n in names}

    def shared_parameters(self):
        return iter([self.theta])

    def task_parameters(self, name):
        return iter([])


def engine_step(a: torch.Tensor, method: Method) -> torch.Tensor:
    """The direction the engine's representation step puts into theta for the feature gradients ``a``."""
    k, b = a.shape[:2]
    tasks = [Task(f"t{i}", "regression", 1) for i in range(k)]
    src = [TaskData(torch.zeros(b, 1), {t.name: torch.full((b,), -b / 2) for t in tasks})]
    model = GivenFeatureGradients(a)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = StepContext(0, 0, generator=torch.Generator().manual_seed(0))
    train_step(model, method, method.init(), src, [torch.arange(b)], tasks, opt, ctx, lambda *args: None)
    return model.theta.grad


def test_engine_gramian_over_samples_and_chunks_is_the_exact_float64_one():
    # 4 samples x 5000 features = 20000 columns per task: two upcast chunks at K = 5, the last one short
    a = nearly_dependent_rows()
    k = a.shape[0]
    assert a[0].numel() > max(256, jac._CHUNK // k)
    j64 = a.reshape(k, -1).double()
    seen = {}

    def spy(g):
        seen["g"] = g
        return torch.ones(k, dtype=g.dtype)

    d = engine_step(a, Method("spy", "aggregator", stateless(spy, "gramian"), mode="representation"))
    assert seen["g"].dtype == torch.float64
    torch.testing.assert_close(seen["g"], j64 @ j64.T, rtol=1e-13, atol=0)
    torch.testing.assert_close(d, a.sum(0), rtol=1e-6, atol=1e-7)  # J^T 1: the update is the summed gradient


@pytest.mark.parametrize("name", AGGREGATORS)
def test_engine_direction_over_samples_is_the_float64_one(name):
    """Every aggregator, through the representation step on nearly dependent float32 per-sample gradients (several
    rows per task, several upcast chunks), gives the direction computed from the exact float64 Gramian."""
    a = nearly_dependent_rows(seed=1)
    k = a.shape[0]
    names = [f"t{i}" for i in range(k)]
    method = build_method(MethodConfig(name=name, grad_mode="representation"), names)
    d = engine_step(a, method).double().reshape(-1)
    j64 = a.reshape(k, -1).double()
    ref_ctx = StepContext(0, 0, losses=torch.full((k,), a.shape[1] ** 2 / 4),
                          generator=torch.Generator().manual_seed(0), grad_dtype=a.dtype)
    assert_is_float64_direction(d, j64, name, names, ref_ctx, name)


def test_rows_and_stacked_blocks_give_the_same_gramian_and_update():
    a = nearly_dependent_rows(k=6, b=3, d=7000, seed=2)
    rows = Rows(tuple(a.unbind(0)), a.shape[1:], a.dtype, a.device)
    g_rows, g_stack = gramian([rows]), gramian([a])
    j64 = a.reshape(6, -1).double()
    torch.testing.assert_close(g_rows, g_stack, rtol=1e-13, atol=0)
    torch.testing.assert_close(g_rows, j64 @ j64.T, rtol=1e-13, atol=0)
    w = torch.linspace(-1, 2, 6, dtype=torch.float64)
    (d_rows,), (d_stack,) = combine(w, [rows]), combine(w, [a])
    assert d_rows.dtype == torch.float32 and d_rows.shape == a.shape[1:]
    torch.testing.assert_close(d_rows.double(), torch.tensordot(w, a.double(), dims=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_rows, d_stack, rtol=1e-5, atol=1e-5)


def test_a_block_no_task_reads_adds_nothing_and_stacks_to_zeros():
    empty = Rows((None, None), torch.Size([3, 4]), torch.float32, torch.device("cpu"))
    full = torch.randn(2, 3, 4)
    g = gramian([empty, full])
    m = full.reshape(2, -1).double()
    torch.testing.assert_close(g, m @ m.T, rtol=1e-13, atol=0)
    assert torch.equal(empty.stack(), torch.zeros(2, 3, 4))
    assert torch.equal(combine(torch.ones(2, dtype=torch.float64), [empty])[0], torch.zeros(3, 4))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 5), shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), blocks=st.integers(1, 3),
       present=st.lists(st.booleans(), min_size=15, max_size=15), seed=st.integers(0, 2**16))
def test_gramian_and_update_of_rows_equal_the_dense_float64_ones(k, shape, blocks, present, seed):
    """Any number of tasks and blocks, any row shape, any pattern of zero (absent) rows, chunks as small as the
    CPU path allows (256 columns): G is the exact float64 Gramian of the dense matrix, zero where a task reads
    nothing, and J^T w is the dense one."""
    gen = torch.Generator().manual_seed(seed)
    parts, dense_parts = [], []
    for i in range(blocks):
        rows = tuple(torch.randn(shape, generator=gen) * 10 ** float(torch.randint(-3, 4, (1,), generator=gen))
                     if present[(i * k + t) % len(present)] else None for t in range(k))
        block = Rows(rows, torch.Size(shape), torch.float32, torch.device("cpu"))
        parts.append(block)
        dense_parts.append(block.stack())
    saved = jac._CHUNK
    jac._CHUNK = 1  # the smallest chunks: max(256, 1 // k) columns
    try:
        g = gramian(parts)
    finally:
        jac._CHUNK = saved
    m = torch.cat([b.reshape(k, -1) for b in dense_parts], 1).double()
    torch.testing.assert_close(g, m @ m.T, rtol=1e-12, atol=0)
    w = torch.randn(k, generator=gen, dtype=torch.float64)
    for got, want in zip(combine(w, parts), dense_parts, strict=True):
        torch.testing.assert_close(got, torch.tensordot(w.float(), want, dims=1), rtol=1e-5, atol=1e-5 * (
            float(want.abs().max()) + 1e-30))
    for block, want in zip(parts, dense_parts, strict=True):
        assert torch.equal(dense(block), want)


def test_the_reused_buffer_is_per_thread():
    """Gramians computed at once in several threads (each upcasting into its own reused buffer) are each exact."""
    mats = [nearly_dependent_rows(k=4, b=2, d=30000, seed=s) for s in range(6)]

    def one(a):
        rows = Rows(tuple(a.unbind(0)), a.shape[1:], a.dtype, a.device)
        return gramian([rows])

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(one, mats))
    for g, a in zip(got, mats, strict=True):
        m = a.reshape(4, -1).double()
        torch.testing.assert_close(g, m @ m.T, rtol=1e-13, atol=0)
