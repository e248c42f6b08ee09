"""One property suite run over every registered aggregator (torchjd style): finite directions of the right shape
on random, zero, rank-deficient (K = rank + 1 and K >= rank + 2), duplicate-row, norm-spread (rows scaled by
logspace(-3, 3, K)) and nearly dependent Jacobians at gradient scales 1e-10 .. 1e10; the properties each method
declares in the registry (non-conflicting, permutation invariant, linear under scaling, no zero update while a
common descent direction exists); what K = 1 gives; clear errors on NaN/inf; exact resume from a checkpointed
state."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from polytask.aggregators import aggregate, build_aggregator
from polytask.engine import checkpoint
from polytask.methods import load_all
from polytask.weighting.base import StepContext

ENTRIES = {e.name: e for e in load_all() if e.extra.get("kind") == "aggregator"}
NAMES = sorted(ENTRIES)
SCALES = [1e-10, 1e-3, 1.0, 1e3, 1e10]
KINDS = ["random", "mixed_norms", "zero", "rank_deficient", "low_rank", "duplicate_rows", "opposite", "norm_spread",
         "near_dependent"]
PROPS = ("non_conflicting", "permutation_invariant", "scale_equivariant", "zero_only_if_zero_in_hull")


def declared(prop):
    return [n for n in NAMES if ENTRIES[n].extra.get(prop) is True]


# What K = 1 gives, d = factor(|g|) * g, with default parameters and unit losses (derivations in each docstring):
# the plain gradient for most; CAGrad (c = 0.4, rescale 1): g0 + c|g0| g/|g| = (1 + c) g, over 1 + c^2;
# Nash-MTL: g^2 a = 1/a -> a = 1/|g|; FairGrad (alpha = 1): |g|^2 w = w^-1 -> w = 1/|g|;
# DB-MTL: first EMA step (1 - beta) g / (L + 1e-8), beta = 0.9, rescaled to its own (max) norm.
K1_FACTOR = {
    "mean": lambda n: 1.0, "sum": lambda n: 1.0, "mgda": lambda n: 1.0, "pcgrad": lambda n: 1.0,
    "gradvac": lambda n: 1.0, "imtl_g": lambda n: 1.0, "aligned_mtl": lambda n: 1.0, "upgrad": lambda n: 1.0,
    "dualproj": lambda n: 1.0, "graddrop": lambda n: 1.0, "config": lambda n: 1.0, "gradnorm": lambda n: 1.0,
    "cagrad": lambda n: 1.4 / 1.16, "nashmtl": lambda n: 1.0 / n, "fairgrad": lambda n: 1.0 / n,
    "dbmtl": lambda n: 0.1 / (1.0 + 1e-8),
}
# d(aJ) = a^degree d(J) for the methods that are not linear under scaling but follow a power law:
# Nash-MTL / FairGrad solve G w = w^(-1/alpha): w -> a^(-2 alpha/(1+alpha)) w, degree (1-alpha)/(1+alpha) = 0.
SCALE_DEGREE = {"nashmtl": 0.0, "fairgrad": 0.0}


def make_ctx(k, seed=0):
    return StepContext(step=0, epoch=0, losses=torch.ones(k, dtype=torch.float64),
                       generator=torch.Generator().manual_seed(seed))


def run(name, jac, seed=0):
    return aggregate(name, jac, ctx=make_ctx(jac.shape[0], seed))[0]


def jacobian(kind, seed, k=None, p=None):
    """A float64 K x P Jacobian of the given kind with entries of order 1."""
    rng = np.random.default_rng(seed)
    k = k or int(rng.integers(3 if kind in ("low_rank", "near_dependent") else 1, 7))
    p = p or int(rng.integers(1, 21))
    j = rng.standard_normal((k, p))
    if kind == "mixed_norms":
        j *= 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    elif kind == "zero":
        j[:] = 0.0
    elif kind == "rank_deficient":  # K = rank + 1 when P >= K
        r = max(1, min(k, p) - 1)
        j = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    elif kind == "low_rank":  # K >= rank + 2 (where IMTL-G's equations only allow d = 0)
        r = int(rng.integers(1, k - 1))
        j = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    elif kind == "norm_spread":  # rows normalised, then scaled by logspace(-3, 3, K) in random order
        j = j / np.linalg.norm(j, axis=1, keepdims=True) * np.logspace(-3, 3, k)[rng.permutation(k), None]
    elif kind == "near_dependent":  # rank 2 plus 1e-4 relative noise
        j = rng.standard_normal((k, 2)) @ rng.standard_normal((2, p)) + 1e-4 * rng.standard_normal((k, p))
    elif kind == "duplicate_rows":
        j[k // 2:] = j[0]
    elif kind == "opposite":
        j[1::2] = -j[0] * rng.uniform(0.1, 10.0)
    return torch.from_numpy(j)


def conflicts(jac, d):
    """Per-task conflict (J d)_i measured against a tolerance relative to the gradient scale."""
    g = jac.double()
    dots = g @ d.double()
    norms = g.norm(dim=1)
    tol = 1e-6 * norms * (d.double().norm() + 1e-4 * norms.max())
    return dots + tol


def test_every_aggregator_declares_its_properties():
    assert NAMES, "no aggregator registered"
    assert set(K1_FACTOR) == set(NAMES), "every aggregator needs its K = 1 behaviour stated above"
    for name, e in ENTRIES.items():
        for prop in PROPS:
            assert isinstance(e.extra.get(prop), bool), (name, prop)
        assert e.paper and e.summary and issubclass(e.params, BaseModel)
        assert e.params.model_config.get("extra") == "forbid", name
        for field in e.params.model_fields.values():
            assert field.description, (name, field)
        assert (e.extra["scale_equivariant"] or name in SCALE_DEGREE or name == "gradnorm"), name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_finite_direction_of_right_shape(name, kind):
    for seed in range(3):
        base = jacobian(kind, seed)
        for scale in SCALES:
            jac = (base * scale).float()
            d = run(name, jac, seed)
            assert d.shape == (jac.shape[1],) and d.dtype == jac.dtype
            assert torch.isfinite(d).all(), (name, kind, scale, seed)
            if kind == "zero":
                assert (d == 0).all()


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.sampled_from(SCALES))
@pytest.mark.parametrize("name", NAMES)
def test_finite_on_hypothesis_matrices(name, seed, scale):
    jac = (jacobian(KINDS[seed % len(KINDS)], seed) * scale).float()
    assert torch.isfinite(run(name, jac, seed)).all()


@pytest.mark.parametrize("name", declared("non_conflicting"))
def test_non_conflicting(name):
    for kind in KINDS:
        for seed in range(6):
            for scale in SCALES:
                jac = jacobian(kind, seed) * scale
                assert (conflicts(jac, run(name, jac, seed)) >= 0).all(), (name, kind, seed, scale)


@pytest.mark.parametrize("name", declared("non_conflicting") + declared("non_conflicting_if_independent"))
def test_non_conflicting_for_independent_gradients(name):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, 7))
        jac = jacobian("mixed_norms" if seed % 2 else "random", seed, k=k, p=k + int(rng.integers(0, 10)))
        assert (conflicts(jac, run(name, jac, seed)) >= 0).all(), (name, seed)


def common_descent(kind, seed, scale=1.0):
    """A Jacobian of the given kind whose rows are sign-flipped so that J c > 0 for a random c: a common descent
    direction exists, so 0 is not in the convex hull of the rows."""
    jac = jacobian(kind, seed).numpy()
    c = np.random.default_rng(seed + 1).standard_normal(jac.shape[1])
    dots = jac @ c
    jac = jac * np.where(dots < 0, -1.0, 1.0)[:, None]
    return torch.from_numpy(jac * scale), bool((np.abs(dots) > 1e-9 * np.linalg.norm(jac, axis=1)).all())


@pytest.mark.parametrize("name", declared("zero_only_if_zero_in_hull"))
def test_no_zero_update_while_a_common_descent_direction_exists(name):
    # a zero update is legitimate only when no direction improves every task (0 in the convex hull: MGDA's
    # min-norm point, the dual cone {0}, ...); where J c > 0 for some c every declared method must move. Before
    # the fix IMTL-G returned |d| = 2e-15 on rank-deficient K >= rank + 2 inputs, and the float32 training
    # path gave ConFIG all-zero weights on nearly dependent gradients
    degree = SCALE_DEGREE.get(name, 1.0)  # |d| scales as |g|^degree (Nash-MTL's |d| = sqrt(K) at any scale)
    for kind in [k for k in KINDS if k not in ("zero", "opposite")]:
        for seed in range(8):
            for scale in (1e-6, 1.0, 1e6):
                jac, ok = common_descent(kind, seed, scale)
                if not ok:
                    continue
                for j in (jac, jac.float()):
                    d = run(name, j, seed).double()
                    size = j.double().norm(dim=1).max() ** degree
                    assert d.norm() > 1e-9 * size, (name, kind, seed, scale, j.dtype)


@pytest.mark.parametrize("name", declared("permutation_invariant"))
def test_permutation_invariance(name):
    for kind in ["random", "mixed_norms", "duplicate_rows", "opposite", "low_rank", "norm_spread", "near_dependent"]:
        for seed in range(6):
            jac = jacobian(kind, seed, p=10)
            perm = torch.from_numpy(np.random.default_rng(seed).permutation(jac.shape[0]))
            d, dp = run(name, jac, seed), run(name, jac[perm], seed)
            torch.testing.assert_close(dp, d, rtol=1e-6, atol=1e-9 * jac.abs().max().item())


def test_projection_methods_depend_on_task_order():
    # PCGrad / GradVac are declared order dependent: with three pairwise-conflicting gradients the order in
    # which g_0 is projected off g_1 and g_2 changes the result
    jac = torch.tensor([[1.0, 0.0], [-0.5, 1.0], [-0.5, -1.0]], dtype=torch.float64)
    for name in ("pcgrad", "gradvac"):
        assert not ENTRIES[name].extra["permutation_invariant"]
        d = aggregate(name, jac)[0]
        dp = aggregate(name, jac[[0, 2, 1]])[0]
        assert not torch.allclose(d, dp)


@pytest.mark.parametrize("name", NAMES)
def test_scaling(name):
    degree = 1.0 if ENTRIES[name].extra["scale_equivariant"] else SCALE_DEGREE.get(name)
    if degree is None:
        pytest.skip(f"{name} declares no power law under scaling")
    for kind in ["random", "mixed_norms", "rank_deficient", "low_rank", "duplicate_rows", "norm_spread",
                 "near_dependent"]:
        for seed in range(3):
            jac = jacobian(kind, seed)
            d = run(name, jac, seed)
            size = max(d.norm().item(), jac.abs().max().item())
            for a in SCALES:
                da = run(name, jac * a, seed)
                torch.testing.assert_close(da, d * a**degree, rtol=1e-6, atol=1e-9 * a**degree * size)


@pytest.mark.parametrize("name", NAMES)
def test_single_task(name):
    for scale in SCALES:
        for seed in range(3):
            g = jacobian("random", seed, k=1, p=7) * scale
            d = run(name, g, seed)
            expected = K1_FACTOR[name](g.norm().item()) * g[0]
            torch.testing.assert_close(d, expected, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_raises_naming_the_aggregator(name, bad):
    jac = torch.randn(3, 5)
    jac[1, 2] = bad
    with pytest.raises(ValueError, match=name):
        run(name, jac)
    agg = build_aggregator(name, None, ["a", "b", "c"])
    m = torch.randn(3, 3, dtype=torch.float64) if agg.input == "gramian" else torch.randn(3, 5)
    m[0, 0] = bad
    with pytest.raises(ValueError, match=f"'{name}'.*NaN or inf"):
        agg.update(agg.init(), m, make_ctx(3))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shape_raises(name):
    agg = build_aggregator(name, None, ["a", "b", "c"])
    with pytest.raises(ValueError, match=name):
        agg.update(agg.init(), torch.zeros(2, 3, dtype=torch.float64), make_ctx(3))


@pytest.mark.parametrize("name", [n for n in NAMES if ENTRIES[n].extra.get("stochastic")])
def test_stochastic_methods_are_deterministic_given_the_generator(name):
    jac = jacobian("random", 1, k=4, p=50)
    torch.testing.assert_close(run(name, jac, seed=5), run(name, jac, seed=5), rtol=0, atol=0)
    d0, d1 = aggregate(name, jac)[0], aggregate(name, jac)[0]
    if name != "graddrop":  # without a generator PCGrad / GradVac use the fixed ascending order
        torch.testing.assert_close(d0, d1, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_resumes_exactly_from_a_checkpoint(name, tmp_path):
    agg = build_aggregator(name, None, ["a", "b", "c"])
    jacs = [jacobian("random", s, k=3, p=6) for s in range(4)]

    def direction(state, s):
        ctx = StepContext(step=s, epoch=0, losses=torch.tensor([1.0, 2.0, 0.5]) * (1 + s),
                          generator=torch.Generator().manual_seed(s))
        return aggregate(agg, jacs[s], state=state, ctx=ctx)

    state = agg.init()
    straight = []
    for s in range(4):
        d, state = direction(state, s)
        straight.append(d)
    state = agg.init()
    for s in range(2):
        _, state = direction(state, s)
    checkpoint.save(tmp_path / "agg.safetensors", state)
    state = checkpoint.load(tmp_path / "agg.safetensors")
    for s in range(2, 4):
        d, state = direction(state, s)
        torch.testing.assert_close(d, straight[s], rtol=0, atol=0)


def test_methods_needing_losses_say_so():
    jac = jacobian("random", 0, k=2, p=4)
    for name in NAMES:
        if ENTRIES[name].extra.get("needs_losses"):
            with pytest.raises(ValueError, match=f"'{name}'.*losses"):
                aggregate(name, jac)


@pytest.mark.parametrize("name", [n for n in NAMES if not ENTRIES[n].extra["non_conflicting"]])
def test_declared_conflicting_methods_do_conflict_somewhere(name):
    # the flag is honest both ways: a method not declared non-conflicting has an input where J d < 0 (for the
    # ones non-conflicting on independent gradients, that input must be rank-deficient; IMTL-G's equal-cosine
    # direction can point against every task when the gradient norms differ a lot)
    if_independent = ENTRIES[name].extra.get("non_conflicting_if_independent", False)
    for seed in range(400):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(2, 6))
        p = int(rng.integers(1, k)) if if_independent else k + int(rng.integers(0, 3))
        jac = torch.from_numpy(rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1)))
        if (conflicts(jac, run(name, jac, seed)) < 0).any():
            return
    pytest.fail(f"{name}: no conflicting input found; should it be declared non_conflicting?")


@pytest.mark.parametrize("name", [n for n in NAMES if not ENTRIES[n].extra["scale_equivariant"]])
def test_declared_non_linear_methods_are_not_linear(name):
    jac = jacobian("mixed_norms", 3, k=3, p=8)
    agg = build_aggregator(name, None, ["a", "b", "c"])

    def two_steps(j):
        state = agg.init()
        for s in range(2):
            d, state = aggregate(agg, j, state=state, ctx=make_ctx(3, s))
        return d

    assert not torch.allclose(two_steps(jac * 1e3), two_steps(jac) * 1e3, rtol=1e-3)
