"""The baselines on small cases: least squares is exact from d examples, ridge is the closed-form posterior mean,
Lasso recovers a sparse w, k-NN and averaging match hand computations, the tree learner improves with n, and every
baseline predicts 0 (or the prior mean) before any point and uses only the points before each query."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.errors import ConfigError
from polytask.icl.baselines import (
    BASELINES,
    Averaging,
    LassoBaseline,
    LeastSquares,
    NearestNeighbours,
    PoolPosterior,
    Ridge,
    TreeBaseline,
    baselines_for,
    build_baseline,
)
from polytask.icl.functions import (
    DecisionTree,
    LinearRegression,
    NoisyLinearRegression,
    SparseLinearRegression,
)
from polytask.icl.prompts import Prompts


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_baseline_is_registered():
    assert BASELINES.names() == ["averaging", "decision_tree", "knn", "lasso", "least_squares", "ridge"]


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(["averaging", "knn", "least_squares", "ridge", "decision_tree"]),
       batch=st.integers(1, 3), n=st.integers(1, 7), d=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_shape_zero_first_and_causal(name, batch, n, d, seed):
    """Changing y_i and the points after i never changes the predictions at positions <= i (the prediction at i
    reads x_i and the points before it)."""
    baseline = build_baseline(name)
    p = LinearRegression(dim=d).sample(gen(seed), batch, n)
    pred = baseline(p)
    assert pred.shape == (batch, n) and pred.dtype == torch.float32 and (pred[:, 0] == 0).all()
    i = n // 2
    xs, ys = p.xs.clone(), p.ys.clone()
    xs[:, i + 1:] += 1.0
    ys[:, i:] -= 2.0
    torch.testing.assert_close(baseline(Prompts(xs, ys))[:, :i + 1], pred[:, :i + 1])


def test_least_squares_is_exact_from_d_examples():
    d = 5
    p = LinearRegression(dim=d).sample(gen(1), 32, 12)
    err = (LeastSquares()(p) - p.ys).square().mean(0) / d
    assert (err[d:] < 1e-10).all()
    assert (err[1:d] > 1e-2).all()  # underdetermined before d points
    # Under a curriculum (last coordinates zeroed: a rank-deficient X), the active dimension's examples suffice.
    q = LinearRegression(dim=8).sample(gen(1), 32, 6, dim=3)
    assert ((LeastSquares()(q) - q.ys).square().mean(0)[3:] / 3 < 1e-10).all()


def test_min_norm_fit_of_a_rank_deficient_batch_item_does_not_depend_on_the_item_before_it():
    """torch's gelsy kept the column pivots of one batch item for the next (pytorch/pytorch#187411): after a
    full-rank item, a rank-2 item got rank 0 and a zero fit."""
    from polytask.icl.baselines import min_norm_fit

    a = torch.zeros(2, 3, 3, dtype=torch.float64)
    a[0] = torch.eye(3, dtype=torch.float64)
    a[1, 0, 1] = a[1, 1, 2] = 1.0
    b = torch.ones(2, 3, dtype=torch.float64)
    for _ in range(20):
        torch.testing.assert_close(min_norm_fit(a, b), (torch.linalg.pinv(a) @ b.unsqueeze(-1)).squeeze(-1))


def test_least_squares_is_the_minimum_norm_fit_when_underdetermined():
    p = LinearRegression(dim=6).sample(gen(2), 4, 5)
    pred = LeastSquares()(p)
    for b in range(4):
        for i in range(1, 5):
            w = np.linalg.lstsq(p.xs[b, :i].double().numpy(), p.ys[b, :i].double().numpy(), rcond=None)[0]
            assert abs(float(p.xs[b, i].double() @ torch.from_numpy(w)) - float(pred[b, i])) < 1e-5


def test_ridge_equals_the_closed_form_posterior_mean():
    """Prior w ~ N(0, tau^2 I), y = Xw + N(0, s^2): posterior mean (X^T X / s^2 + I / tau^2)^-1 X^T y / s^2."""
    s, tau = 0.5, 2.0
    p = NoisyLinearRegression(dim=3, noise_std=s).sample(gen(3), 2, 6)
    pred = Ridge(noise_std=s, prior_std=tau)(p)
    for b in range(2):
        for i in range(1, 6):
            x, y = p.xs[b, :i].double(), p.ys[b, :i].double()
            cov = torch.linalg.inv(x.T @ x / s**2 + torch.eye(3, dtype=torch.float64) / tau**2)
            mean = cov @ x.T @ y / s**2
            assert abs(float(p.xs[b, i].double() @ mean) - float(pred[b, i])) < 1e-5


def test_ridge_beats_least_squares_on_noisy_linear_regression_at_n_equal_d():
    p = NoisyLinearRegression(dim=8, noise_std=1.0).sample(gen(4), 500, 12)
    ridge = (Ridge(noise_std=1.0)(p) - p.ys).square().mean(0)
    ols = (LeastSquares()(p) - p.ys).square().mean(0)
    assert ridge[8] < 0.5 * ols[8]  # least squares interpolates the noise at n = d


def test_ridge_with_zero_noise_is_a_config_error():
    with pytest.raises(ConfigError, match="ridge"):
        Ridge(noise_std=0.0)(LinearRegression(dim=2).sample(gen(), 1, 2))
    with pytest.raises(ConfigError, match=r"baselines\.0\.params\.noise_std"):
        build_baseline("ridge", {"noise_std": 0}, where="baselines.0.params")


def test_lasso_recovers_a_sparse_w():
    d = 10
    p = SparseLinearRegression(dim=d, sparsity=2).sample(gen(5), 3, 9)
    lasso = (LassoBaseline(alpha=0.01)(p) - p.ys).square().mean(0) / d
    ols = (LeastSquares()(p) - p.ys).square().mean(0) / d
    assert lasso[8] < 0.01 and ols[8] > 10 * lasso[8]  # 8 < d points: only the sparse fit can be right


def test_knn_and_averaging_match_hand_computations():
    xs = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0], [0.9, 0.1]]])
    ys = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])
    p = Prompts(xs, ys)
    # 3-NN uniform: position 1 sees {1}; 2 sees {1, 2}; 3 sees {1, 2, 4} (all three); 4: nearest to (0.9, 0.1) are
    # (1, 0), (0, 0), (0, 3) with labels 2, 1, 4.
    torch.testing.assert_close(NearestNeighbours()(p), torch.tensor([[0.0, 1.0, 1.5, 7 / 3, 7 / 3]]))
    one = NearestNeighbours(k=1)(p)
    torch.testing.assert_close(one, torch.tensor([[0.0, 1.0, 1.0, 4.0, 2.0]]))
    # inverse-distance weights at position 2 (query (0, 3)): distances 3 and sqrt(10).
    dist = NearestNeighbours(weights="distance")(p)
    w = torch.tensor([1 / 3, 1 / 10**0.5])
    assert abs(float(dist[0, 2]) - float((w * torch.tensor([1.0, 2.0])).sum() / w.sum())) < 1e-6
    exact = NearestNeighbours(weights="distance")(Prompts(xs[:, [0, 1, 1]], ys[:, [0, 1, 2]]))
    assert float(exact[0, 2]) == 2.0  # an exact match takes all the weight
    # averaging: w_i = mean_{j<i} y_j x_j
    avg = Averaging()(p)
    w3 = (ys[0, :3, None] * xs[0, :3]).mean(0)
    assert abs(float(avg[0, 3]) - float(xs[0, 3] @ w3)) < 1e-6
    assert abs(float(avg[0, 1]) - float(xs[0, 1] @ (ys[0, 0] * xs[0, 0]))) < 1e-6


def test_tree_learner_error_falls_with_n_on_tree_functions():
    p = DecisionTree(dim=4, depth=2).sample(gen(6), 16, 60)
    err = (TreeBaseline(max_depth=2)(p) - p.ys).square()
    assert err[:, 50:].mean() < 0.5 * err[:, 1:6].mean()


def test_pool_posterior_identifies_the_pool_member():
    pool = torch.randn(5, 3, generator=gen(7))
    xs = torch.randn(4, 8, 3, generator=gen(8))
    picks = torch.tensor([0, 2, 4, 1])
    p = Prompts(xs, torch.einsum("bnd,bd->bn", xs, pool[picks]))
    pred = PoolPosterior(pool, noise_std=0.1)(p)
    torch.testing.assert_close(pred[:, 0], (xs[:, 0] @ pool.T).mean(-1))  # the prior mean before any point
    torch.testing.assert_close(pred[:, 4:], p.ys[:, 4:], atol=1e-4, rtol=0)


def test_baselines_for_follow_garg_et_al():
    assert list(baselines_for(LinearRegression())) == ["least_squares", "knn", "averaging"]
    assert "lasso" in baselines_for(SparseLinearRegression())
    ridge = baselines_for(NoisyLinearRegression(noise_std=0.5, scale=2.0))["ridge"]
    assert isinstance(ridge, Ridge) and ridge.lam == pytest.approx(0.0625)
    assert {"decision_tree", "decision_tree_unbounded"} <= set(baselines_for(DecisionTree()))
