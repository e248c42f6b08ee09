"""Error curves (normalisation, bootstrap bands, split prompts) and the task pool of the memorising vs generalising
split."""

import json

import pytest
import torch

from polytask.errors import ConfigError, DataError
from polytask.icl.baselines import LeastSquares, PoolPosterior, Ridge
from polytask.icl.evaluate import (
    TaskPool,
    error_curve,
    error_curves,
    normaliser,
    seen_and_unseen,
    squared_errors,
    summarise,
)
from polytask.icl.functions import (
    DecisionTree,
    LinearRegression,
    NoisyLinearRegression,
    Relu2nnRegression,
    SparseLinearRegression,
    orthant_shift,
)
from polytask.icl.prompts import Prompts


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zero(prompts: Prompts) -> torch.Tensor:
    return torch.zeros_like(prompts.ys)


def test_the_zero_predictor_scores_about_one_after_normalisation():
    for family in (LinearRegression(dim=6), SparseLinearRegression(dim=6, sparsity=2), Relu2nnRegression(dim=6),
                   DecisionTree(dim=6), LinearRegression(dim=6, scale=2.0)):
        p = family.sample(gen(1), 3000, 4)
        curve = error_curve(zero, p, normaliser(family))
        assert all(abs(m - 1) < 0.1 for m in curve.mean), (family.name, curve.mean)
    assert normaliser(LinearRegression(dim=6), dim=3) == 3.0


def test_summarise_matches_hand_statistics_and_bands_contain_the_mean():
    errors = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 4.0], [6.0, 0.0]])
    c = summarise(errors, gen(2), trials=2000)
    assert c.mean == [3.0, 1.0] and c.prompts == 4
    assert c.std[0] == pytest.approx(float(errors[:, 0].std())) and c.stderr[1] == pytest.approx(c.std[1] / 2)
    assert all(lo <= m <= hi for lo, m, hi in zip(c.low, c.mean, c.high, strict=True))
    assert c.low[1] == 0.0 and c.high[1] > 0  # the resampled means of (0, 0, 4, 0) include 0 and exceed it
    assert json.loads(json.dumps(c.as_dict()))["examples"] == [0, 1]
    assert summarise(errors, gen(2), trials=2000) == c  # deterministic given the generator


def test_bands_shrink_with_more_prompts():
    p = LinearRegression(dim=4).sample(gen(3), 2000, 3)
    small, large = error_curve(zero, Prompts(p.xs[:50], p.ys[:50])), error_curve(zero, p)
    assert large.high[1] - large.low[1] < 0.5 * (small.high[1] - small.low[1])


def test_least_squares_curve_reaches_zero_from_d_examples_and_ridge_wins_with_noise():
    curves = error_curves({"ls": LeastSquares(), "zero": zero}, LinearRegression(dim=4).sample(gen(4), 64, 8))
    assert max(curves["ls"].high[4:]) < 1e-10 and curves["zero"].mean[5] > 0.5
    noisy = NoisyLinearRegression(dim=4, noise_std=0.5).sample(gen(5), 500, 8)
    curves = error_curves({"ls": LeastSquares(), "ridge": Ridge(noise_std=0.5)}, noisy)
    assert curves["ridge"].mean[4] < curves["ls"].mean[4]


def test_split_prompts_read_the_query_point_after_the_context_points():
    split = LinearRegression(dim=3).sample_split(gen(6), 16, 6, orthant_shift())
    errors = squared_errors(LeastSquares(), split)
    assert errors.shape == (16, 6) and (errors[:, 3:] < 1e-8).all()  # linear: the orthant does not matter
    calls = []

    def spy(prompts: Prompts) -> torch.Tensor:
        calls.append(prompts)
        return torch.zeros_like(prompts.ys)

    errors = squared_errors(spy, split)
    assert len(calls) == 6 and torch.equal(calls[2].xs[:, 2], split.query.xs[:, 2])
    torch.testing.assert_close(errors, split.query.ys.square())


def test_a_predictor_of_the_wrong_shape_is_a_data_error():
    p = LinearRegression(dim=2).sample(gen(), 2, 3)
    with pytest.raises(DataError, match="expected"):
        squared_errors(lambda q: q.ys[:, :2], p)


def test_task_pool_draws_only_pool_members_and_is_deterministic():
    family = LinearRegression(dim=3)
    pool = TaskPool(family, size=4, seed=7)
    assert torch.equal(pool.ws, TaskPool(family, size=4, seed=7).ws) and pool.ws.shape == (4, 3)
    a, b = pool.sample(gen(8), 50, 5), pool.sample(gen(8), 50, 5)
    assert torch.equal(a.xs, b.xs) and torch.equal(a.ws, b.ws)
    members = {tuple(w.tolist()) for w in pool.ws}
    assert {tuple(w.tolist()) for w in a.ws} == members  # 50 picks out of 4 hit every member
    torch.testing.assert_close(a.ys, torch.einsum("bnd,bd->bn", a.xs, a.ws))
    assert (pool.sample(gen(9), 4, 5, dim=2).xs[:, :, 2] == 0).all()
    with pytest.raises(ConfigError, match="size must be >= 1"):
        TaskPool(family, size=0)


def test_pool_posterior_memorises_and_ridge_generalises():
    """Raventós et al. 2023: with few pretraining tasks, the posterior over the pool beats ridge on the pool's tasks
    and loses to it on fresh tasks."""
    noise = 0.25
    pool = TaskPool(NoisyLinearRegression(dim=4, noise_std=noise), size=3, seed=1)
    predictors = {"pool": PoolPosterior(pool.ws, noise_std=noise), "ridge": Ridge(noise_std=noise)}
    curves = seen_and_unseen(predictors, pool, gen(10), 400, 6, trials=200)
    assert curves["seen"]["pool"].mean[3] < 0.5 * curves["seen"]["ridge"].mean[3]
    assert curves["unseen"]["ridge"].mean[5] < 0.5 * curves["unseen"]["pool"].mean[5]
