"""The K x K solvers meet their optimality conditions: MGDA's KKT conditions on the simplex, the dual-cone
projections' KKT conditions (UPGrad / DualProj), Nash-MTL's and FairGrad's fixed points, and the CAGrad dual
against brute force and its KKT conditions (duality gap). Random, ill-conditioned, rank-deficient,
duplicate-task and norm-spread (rows scaled by logspace(-3, 3, K)) Gramians; tolerances are per task, relative
to that task's gradient norm, so a solver that stops short on the small tasks fails."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.aggregators import _solvers as S
from polytask.aggregators.conflict_free import config_weights


def gramian(seed, kind="random", k=None, p=None):
    """A trace-normalised K x K Gramian of the given kind."""
    rng = np.random.default_rng(seed)
    k = k or int(rng.integers(1, 11))
    p = p or int(rng.integers(1, 25))
    j = rng.standard_normal((k, p))
    if kind == "mixed_norms":
        j *= 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    elif kind == "rank_deficient":
        r = int(rng.integers(1, max(2, min(k, p))))
        j = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    elif kind == "duplicate":
        j[k // 2:] = j[0]
    elif kind == "zero_task":
        j[int(rng.integers(0, k))] = 0.0
    elif kind == "norm_spread":
        j = j / np.linalg.norm(j, axis=1, keepdims=True) * np.logspace(-3, 3, k)[rng.permutation(k), None]
    g, scale = S.normalize(j @ j.T)
    return g if scale > 0 else np.eye(k) / 1.0


KINDS = ["random", "mixed_norms", "rank_deficient", "duplicate", "zero_task", "norm_spread"]


def norms(g):
    return np.sqrt(np.maximum(np.diag(g), 0.0))


def check_mgda_kkt(g, w):
    """w in the simplex, (G w)_i >= w^T G w for all i, with equality on the support; task i's tolerance is
    relative to its own terms, |g_i| sum_j w_j |g_j| (plus the support's, which fix w^T G w)."""
    n = norms(g)
    tol = 1e-9 * n * (w @ n + 1e-4 * n[w > 0].min())  # the rounding of sum(w) = 1 (on the smallest task)
    tol = tol + tol[w > 0].max()
    gw = g @ w
    q = w @ gw
    assert abs(w.sum() - 1) < 1e-12 and (w >= 0).all()
    assert (gw >= q - tol).all()
    assert (np.abs(gw - q)[w > 0] <= tol[w > 0]).all()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.sampled_from(KINDS))
def test_mgda_weights_meet_kkt(seed, kind):
    g = gramian(seed, kind)
    check_mgda_kkt(g, S.min_norm_simplex(g))


def test_mgda_matches_the_closed_form_for_two_tasks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        j = rng.standard_normal((2, 5))
        g = j @ j.T
        # min over t of |t g1 + (1-t) g2|^2: t = (G22 - G12) / (G11 + G22 - 2 G12), clipped to [0, 1]
        t = min(1.0, max(0.0, (g[1, 1] - g[0, 1]) / (g[0, 0] + g[1, 1] - 2 * g[0, 1])))
        np.testing.assert_allclose(S.min_norm_simplex(S.normalize(g)[0]), [t, 1 - t], atol=1e-12)


def check_projection_kkt(g, u, v):
    """v = argmin_{v >= u} v^T G v: l = v - u >= 0, G v >= 0 (J^T v in the dual cone) and l_j (G v)_j = 0, with
    the solvers' 1e-10 relative ridge as tolerance, measured against |g_j| (|J^T v| + 1e-9 |g|max |v|_1)."""
    norms = np.sqrt(np.maximum(np.diag(g), 0))
    lam, gv = v - u, g @ v
    slack = norms * (math.sqrt(max(v @ g @ v, 0)) + 1e-9 * norms.max() * np.abs(v).sum()) + 1e-300
    assert (lam >= -1e-15).all()
    assert (gv >= -slack).all()
    assert (np.abs(lam * gv) <= np.abs(lam) * slack).all()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.sampled_from(KINDS))
def test_upgrad_and_dualproj_projections_meet_kkt(seed, kind):
    g = gramian(seed, kind)
    k = len(g)
    for u, v in zip(np.eye(k), S.dual_cone_weights(g, np.eye(k)), strict=True):
        check_projection_kkt(g, u, v)
    u = np.full(k, 1.0 / k)
    check_projection_kkt(g, u, S.dual_cone_weights(g, u[None])[0])


@pytest.mark.parametrize("simplex", [True, False])
def test_primal_active_set_meets_kkt_from_any_start(simplex):
    # the fallback of qp_batch, exercised directly (cold and warm starts)
    for seed in range(200):
        g = gramian(seed, KINDS[seed % len(KINDS)])
        k = len(g)
        rng = np.random.default_rng(seed)
        u = rng.uniform(0, 1, k)
        b = np.zeros(k) if simplex else S.ridged(g) @ u
        h = g if simplex else S.ridged(g)
        for x0 in (None, rng.uniform(-1, 1, k)):
            x = S.active_set_qp(h, b, simplex, x0=x0)
            if simplex:
                check_mgda_kkt(g, x)
            else:
                check_projection_kkt(g, u, u + x)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.sampled_from(["random", "mixed_norms"]), st.sampled_from([0.5, 1.0, 2.0, 5.0]))
def test_nash_and_fairgrad_weights_solve_their_fixed_point(seed, kind, alpha):
    # linearly independent gradients (K <= P), where a positive solution exists (Nash-MTL Thm 5.1). Norms span
    # 1e4, so cond(G) reaches ~1e9; for alpha < 0.5 the residual itself is then not computable in float64
    # (w^(1/alpha) ~ 1e15 against a cancelling (G w)_i)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 11))
    g = gramian(seed, kind, k=k, p=k + int(rng.integers(0, 10)))
    w = S.power_fixed_point(g, 1.0 / alpha)
    assert (w > 0).all()
    np.testing.assert_allclose((g @ w) * w ** (1.0 / alpha), 1.0, rtol=0, atol=1e-8)


def test_nash_weights_stay_finite_without_a_positive_solution():
    # g, -g: (G a)_1 = a1 - a2 = 1/a1 and a2 - a1 = 1/a2 cannot both hold; the ridge keeps a finite answer and
    # symmetric weights give the zero direction
    g = np.array([[1.0, -1.0], [-1.0, 1.0]])
    w = S.power_fixed_point(g, 1.0)
    assert np.isfinite(w).all() and (w > 0).all()
    assert abs(w[0] - w[1]) <= 1e-6 * w[0]


def cagrad_objective(g, r, w):
    return g.mean(axis=1) @ w + r * math.sqrt(max(w @ g @ w, 0.0))


def brute_force_dual(g, r):
    """Minimum of the CAGrad dual over a fine grid of the simplex (K = 2: 200001 points; K = 3: 601^2 / 2)."""
    if len(g) == 2:
        t = np.linspace(0, 1, 200_001)
        ws = np.stack([t, 1 - t], 1)
    else:
        a, b = np.meshgrid(np.linspace(0, 1, 601), np.linspace(0, 1, 601))
        keep = a + b <= 1
        ws = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    vals = ws @ g.mean(axis=1) + r * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", ws, g, ws), 0))
    return float(vals.min())


def check_cagrad_kkt(g, r, w, u):
    """The CAGrad dual's optimality, checked on the primal side: d = g0 + r J^T u lies in the ball
    |d - g0| <= r, and its worst-task improvement min_i g_i . d equals the dual value a . w + r |g_w| at the
    simplex point w (weak duality makes the gap >= 0; zero gap proves both optimal). Task i's improvement
    (a + r G u)_i is resolved to 1e-9 of |g_i| (mean_j |g_j| + r sum_j |u_j| |g_j|), its own rounding scale."""
    n = norms(g)
    assert abs(w.sum() - 1) < 1e-12 and (w >= 0).all()
    assert u @ g @ u <= 1.0 + 1e-9 * max(1.0, np.abs(u) @ n) ** 2  # inside the ball
    improvement = g.mean(axis=1) + r * (g @ u)
    dual = g.mean(axis=1) @ w + r * math.sqrt(max(w @ g @ w, 0.0))
    worst = int(np.argmin(improvement))
    size = 1e-9 * n * (n.mean() + r * (np.abs(u) @ n + 1e-4 * np.abs(u).max() * n[u != 0].min(initial=0.0)))
    q = max(w @ g @ w, 0.0)
    sqrt_rounding = r * (math.sqrt(q + 1e-13 * (w @ n) ** 2) - math.sqrt(q))  # |g_w| from a rounded w^T G w
    assert dual - improvement[worst] <= w @ size + size[worst] + sqrt_rounding, (dual, improvement[worst])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.sampled_from(KINDS), st.sampled_from([0.1, 0.4, 0.5, 1.0, 3.0]))
def test_cagrad_dual_meets_kkt(seed, kind, c):
    g = gramian(seed, kind)
    r = c * math.sqrt(max(g.mean(), 0.0))
    if r > 0:
        check_cagrad_kkt(g, r, *S.cagrad_dual(g, r))


@pytest.mark.parametrize("spread", [1.0, 3.0, 5.0])
def test_cagrad_dual_meets_kkt_when_task_norms_are_spread(spread):
    # rows normalised, then scaled by logspace(-spread, spread, K): the optimum is decided by the smallest
    # tasks, whose Gram entries are 1e-2 * spread orders below the largest; an absolute tolerance (or an
    # unscaled LU) stops short there (before the fix: worst-task improvement -5.5e-3 where +4.3e-2 is possible)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(2, 11))
        j = rng.standard_normal((k, int(rng.choice([3, 20, 1000]))))
        j = j / np.linalg.norm(j, axis=1, keepdims=True) * np.logspace(-spread, spread, k)[rng.permutation(k), None]
        g, _ = S.normalize(j @ j.T)
        for c in (0.1, 0.5, 2.0):
            r = c * math.sqrt(g.mean())
            w, u = S.cagrad_dual(g, r)
            check_cagrad_kkt(g, r, w, u)
            gap, tol = S.cagrad_kkt(g, r, w, u)  # the solver's own certificate agrees
            assert gap <= tol


def test_cagrad_dual_when_the_ball_meets_the_dual_cone():
    # 0 in the convex hull (g1, g2 opposite) and a radius that reaches {d : J d >= 0} = {d1 = 0, d2 >= 0}:
    # every d there is optimal (worst-task improvement 0); the solver returns the one closest to g0, the
    # projection (0, 1/3) of g0 onto the cone (before: a limit direction that conflicts with g2)
    j = np.array([[1.0, 0.0], [-2.0, 0.0], [0.5, 1.0]])
    g, _ = S.normalize(j @ j.T)
    for c in (0.5, 3.0):
        r = c * math.sqrt(g.mean())
        w, u = S.cagrad_dual(g, r)
        check_cagrad_kkt(g, r, w, u)
        np.testing.assert_allclose(j.T @ (1 / 3 + r * u), [0.0, 1 / 3], atol=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_dual_matches_brute_force(k):
    rng = np.random.default_rng(k)
    for trial in range(60):
        p = int(rng.integers(1, 6))
        j = rng.standard_normal((k, p)) * np.exp(rng.uniform(-1, 1, (k, 1)))
        if trial % 4 == 0:
            j[1] = -0.5 * j[0]  # zero in the convex hull
        g, _ = S.normalize(j @ j.T)
        r = rng.uniform(0.1, 1.5) * math.sqrt(g.mean())
        w, u = S.cagrad_dual(g, r)
        best = brute_force_dual(g, r)
        ours = cagrad_objective(g, r, w)
        # never worse than any grid point (up to the rounding of |g_w| = sqrt(w^T G w) when g_w ~ 0)
        assert ours <= best + 1e-9 * r + r * math.sqrt(1e-13) * (w @ norms(g))
        assert ours >= best - (1e-4 if k == 2 else 1e-2) * (1 + r)  # grid resolution x Lipschitz bound
        check_cagrad_kkt(g, r, w, u)


def test_cagrad_dual_first_order_optimality():
    # at the optimum no simplex direction decreases a.w + r |g_w|: min_i (a + r G u)_i = (a + r G u) . w
    rng = np.random.default_rng(7)
    for _ in range(200):
        k = int(rng.integers(2, 9))
        j = rng.standard_normal((k, k + 3))
        g, _ = S.normalize(j @ j.T)
        r = rng.uniform(0.05, 2.0) * math.sqrt(g.mean())
        w, u = S.cagrad_dual(g, r)
        grad = g.mean(axis=1) + r * (g @ u)
        assert grad.min() >= grad @ w - 1e-9


def test_config_direction_has_equal_cosines():
    # ConFIG (full rank): g_i . d / |g_i| is the same for every task and positive
    rng = np.random.default_rng(3)
    for _ in range(100):
        k = int(rng.integers(1, 8))
        j = rng.standard_normal((k, k + 4)) * np.exp(rng.uniform(-2, 2, (k, 1)))
        g = j @ j.T
        d = j.T @ config_weights(g)
        cos = (j @ d) / np.linalg.norm(j, axis=1)
        np.testing.assert_allclose(cos, cos[0], rtol=1e-8)
        assert cos[0] > 0


def test_zero_gramian_normalises_to_zero_scale():
    g, scale = S.normalize(np.zeros((3, 3)))
    assert scale == 0.0 and (g == 0).all()
