"""The known learners an in-context learner is compared with (Garg et al. 2022, NeurIPS, Sec. 3 and their
``src/models.py``; Raventós et al. 2023, NeurIPS, for the posterior mean over a finite pool of tasks).

Every baseline is a predictor: a callable ``Prompts -> B x n`` whose column i is the prediction of y_i from the
points 1..i-1 of the same prompt (0 where no point is seen, as theirs). Averaging, k-NN and the pool posterior are
vectorised over the batch and the prefixes, least squares and ridge over the batch (one batched solve per prefix);
Lasso and the tree learner fit scikit-learn models prompt by prompt, prefix by prefix, as theirs.

Deliberate differences from Garg et al.'s code: least squares runs in float64 (their float32), off the CPU through
the pseudo-inverse (their CUDA path moves to the CPU first); ridge
(not in their baselines) is added as the Bayes-optimal learner of noisy linear regression; Lasso does not stop on a
convergence warning (theirs raises); the tree learner fixes ``random_state=0`` so it is deterministic; their
XGBoost and gradient-descent network baselines are left out (XGBoost is not a dependency).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.errors import ConfigError
from polytask.icl.functions import DecisionTree, FunctionFamily, NoisyLinearRegression, SparseLinearRegression
from polytask.icl.prompts import Prompts
from polytask.registry import Registry

Predictor = Callable[[Prompts], Tensor]
"""Prompts -> B x n predictions, column i from the points before i."""


def prefix_mask(n: int) -> Tensor:
    """n x n, entry (i, j) true when point j precedes point i (j < i)."""
    return torch.ones(n, n, dtype=torch.bool).tril(-1)


def prefix_fits(prompts: Prompts, fit: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Per-position weights B x n x d: ``fit(X, y)`` (float64, X B x i x d, y B x i) on the points before each
    position i >= 1, zero at position 0; batched over the prompts, one fit per position (memory O(B n d))."""
    xs, ys = prompts.xs.double(), prompts.ys.double()
    w = torch.zeros_like(xs)
    for i in range(1, xs.shape[1]):
        w[:, i] = fit(xs[:, :i], ys[:, :i])
    return w


def predict_linear(prompts: Prompts, w: Tensor) -> Tensor:
    """x_i . w_i for per-position weights ``w`` (B x n x d), in the prompts' dtype."""
    return torch.einsum("bnd,bnd->bn", prompts.xs.double(), w).to(prompts.ys.dtype)


def min_norm_fit(xs: Tensor, ys: Tensor) -> Tensor:
    """The minimum-norm least-squares solution X^+ y for batched X (B x m x d), y (B x m): LAPACK's SVD-based gelsd
    on CPU, the pseudo-inverse elsewhere.

    Garg et al. call ``torch.linalg.lstsq`` with its CPU default, gelsy (QR with column pivoting). Here gelsy is
    not used: torch's CPU kernel passes it a pivot array that is not reset between calls and batch items
    (pytorch/pytorch#187411): on rank-deficient prompts (a curriculum's zeroed coordinates) it returned a wrong
    rank, and a wrong fit, in 0-53 % of the calls depending on the process. gelsd gives the minimum-norm solution
    on every call."""
    if xs.device.type == "cpu":
        return torch.linalg.lstsq(xs, ys.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    return (torch.linalg.pinv(xs) @ ys.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LeastSquares:
    """The minimum-norm least-squares fit of the points seen, w = X^+ y (Garg et al.'s ``LeastSquaresModel``);
    optimal for noiseless linear regression once n >= d."""

    name: str = "least_squares"

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (0 at the first point)."""
        return predict_linear(prompts, prefix_fits(prompts, min_norm_fit))


def ridge_weights(xs: Tensor, ys: Tensor, lam: float) -> Tensor:
    """(X^T X + lam I)^-1 X^T y for batched X (... x m x d) and y (... x m)."""
    gram = xs.transpose(-1, -2) @ xs + lam * torch.eye(xs.shape[-1], dtype=xs.dtype, device=xs.device)
    return torch.linalg.solve(gram, (xs.transpose(-1, -2) @ ys.unsqueeze(-1))).squeeze(-1)


@dataclass(frozen=True)
class Ridge:
    """Ridge regression with lambda = noise_std^2 / prior_std^2: the posterior mean of w under the prior
    w ~ N(0, prior_std^2 I) and labels y = w.x + N(0, noise_std^2), i.e. the Bayes-optimal predictor of noisy
    linear regression (Garg et al. Sec. 4 compare with it implicitly; Raventós et al. 2023 name it the ridge
    estimator)."""

    noise_std: float = 1.0
    prior_std: float = 1.0
    name: str = "ridge"

    @property
    def lam(self) -> float:
        """The ridge penalty noise_var / prior_var."""
        return (self.noise_std / self.prior_std) ** 2

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (0 at the first point: the prior mean)."""
        if self.lam <= 0:
            raise ConfigError(f"baseline 'ridge': noise_std / prior_std must be > 0 (got {self.noise_std} / "
                              f"{self.prior_std}); use least_squares for noiseless labels")
        return predict_linear(prompts, prefix_fits(prompts, lambda x, y: ridge_weights(x, y, self.lam)))


@dataclass(frozen=True)
class Averaging:
    """w = mean over the points seen of y_j x_j, prediction x_i . w (Garg et al.'s ``AveragingModel``)."""

    name: str = "averaging"

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (0 at the first point)."""
        zs = prompts.xs.double() * prompts.ys.double().unsqueeze(-1)
        seen = torch.cumsum(zs, 1) - zs  # sum over j < i
        count = torch.arange(zs.shape[1], dtype=zs.dtype, device=zs.device).clamp(min=1)
        return predict_linear(prompts, seen / count[None, :, None])


@dataclass(frozen=True)
class NearestNeighbours:
    """The mean label of the ``k`` nearest points seen (Euclidean; all of them when fewer than k are seen), uniform
    or inverse-distance ``weights`` with an exact match taking all the weight (Garg et al.'s ``NNModel``, k = 3)."""

    k: int = 3
    weights: Literal["uniform", "distance"] = "uniform"
    name: str = "knn"

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (0 at the first point)."""
        xs, ys = prompts.xs.double(), prompts.ys.double()
        n = xs.shape[1]
        before = prefix_mask(n).to(xs.device)
        dist = torch.cdist(xs, xs).masked_fill(~before, float("inf"))  # B x n(query) x n(point)
        k = min(self.k, max(n - 1, 1))
        near, idx = dist.topk(k, dim=-1, largest=False)
        labels = ys[:, None, :].expand(-1, n, -1).gather(2, idx)
        valid = near.isfinite()
        if self.weights == "uniform":
            w = valid.double()
        else:
            exact = valid & (near == 0)
            w = torch.where(exact.any(-1, keepdim=True), exact.double(), torch.where(valid, 1 / near, 0.0))
        total = w.sum(-1)
        pred = (w * labels).sum(-1) / total.clamp(min=1e-300)
        return torch.where(total > 0, pred, 0.0).to(prompts.ys.dtype)


@dataclass(frozen=True)
class PoolPosterior:
    """The posterior mean of w over a finite pool of M weight vectors (uniform prior over the pool, Gaussian label
    noise of std ``noise_std``): Raventós et al. 2023's dMMSE estimator, the memorising learner of a finite task
    pool (weights softmax_m(-|y - X w_m|^2 / (2 noise_std^2)))."""

    pool: Tensor
    noise_std: float = 1.0
    name: str = "pool_posterior"

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (the pool's mean at the first point)."""
        if self.noise_std <= 0:
            raise ConfigError(f"baseline 'pool_posterior': noise_std must be > 0, got {self.noise_std}")
        pool = self.pool.double().to(prompts.xs.device)  # M x d
        fits = torch.einsum("bnd,md->bnm", prompts.xs.double(), pool)  # x_j . w_m
        sq = (prompts.ys.double().unsqueeze(-1) - fits).square()
        seen = torch.cumsum(sq, 1) - sq  # residuals of the points before i
        post = torch.softmax(-seen / (2 * self.noise_std**2), dim=-1)  # B x n x M
        return (post * fits).sum(-1).to(prompts.ys.dtype)


def per_prefix(fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], float], prompts: Prompts) -> Tensor:
    """Run ``fit_predict(train_x, train_y, query_x)`` for every prompt and every position i >= 1 (0 at i = 0)."""
    xs, ys = prompts.xs.cpu().double().numpy(), prompts.ys.cpu().double().numpy()
    out = np.zeros(ys.shape)
    for b in range(ys.shape[0]):
        for i in range(1, ys.shape[1]):
            out[b, i] = fit_predict(xs[b, :i], ys[b, :i], xs[b, i:i + 1])
    return torch.from_numpy(out).to(dtype=prompts.ys.dtype, device=prompts.ys.device)


@dataclass(frozen=True)
class LassoBaseline:
    """Lasso without intercept, scikit-learn's objective |y - Xw|^2 / (2m) + alpha |w|_1 (Garg et al.'s
    ``LassoModel``; their plots use alpha = 0.01)."""

    alpha: float = 0.01
    max_iter: int = 100_000
    name: str = "lasso"

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (0 at the first point)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import Lasso

        def fit(x: np.ndarray, y: np.ndarray, q: np.ndarray) -> float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = Lasso(alpha=self.alpha, fit_intercept=False, max_iter=self.max_iter).fit(x, y)
            return float(model.predict(q)[0])

        return per_prefix(fit, prompts)


@dataclass(frozen=True)
class TreeBaseline:
    """A greedy regression tree (scikit-learn's CART, ``max_depth`` 4 like the trees drawn, or None: grown until
    pure), refit on every prefix (Garg et al.'s ``DecisionTreeModel``, their "greedy tree learning")."""

    max_depth: int | None = 4
    name: str = "decision_tree"

    def __call__(self, prompts: Prompts) -> Tensor:
        """Predictions for every prefix (0 at the first point)."""
        from sklearn.tree import DecisionTreeRegressor

        def fit(x: np.ndarray, y: np.ndarray, q: np.ndarray) -> float:
            return float(DecisionTreeRegressor(max_depth=self.max_depth, random_state=0).fit(x, y).predict(q)[0])

        return per_prefix(fit, prompts)


# ---------------------------------------------------------------- registry


class _Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RidgeParams(_Empty):
    """Parameters of ridge: the prior and noise it is Bayes-optimal for."""

    noise_std: float = Field(1.0, gt=0, description="label noise std (lambda = noise_std^2 / prior_std^2)")
    prior_std: float = Field(1.0, gt=0, description="prior std of each weight")


class LassoParams(_Empty):
    """Parameters of Lasso."""

    alpha: float = Field(0.01, gt=0, description="l1 penalty (scikit-learn's alpha)")
    max_iter: int = Field(100_000, ge=1, description="coordinate-descent iterations")


class KnnParams(_Empty):
    """Parameters of k nearest neighbours."""

    k: int = Field(3, ge=1, description="neighbours")
    weights: Literal["uniform", "distance"] = Field("uniform", description="uniform or inverse-distance weights")


class TreeParams(_Empty):
    """Parameters of the tree learner."""

    max_depth: int | None = Field(4, ge=1, description="maximum depth (null: grown until pure)")


BASELINES: Registry[Callable[[BaseModel], Predictor]] = Registry("baseline")
_GARG = "Garg et al. 2022, NeurIPS"
BASELINES.register("least_squares", summary="minimum-norm least squares", paper=_GARG)(lambda p: LeastSquares())
BASELINES.register("ridge", params=RidgeParams, summary="posterior mean under a Gaussian prior",
                   paper="Raventós et al. 2023, NeurIPS")(lambda p: Ridge(**p.model_dump()))
BASELINES.register("lasso", params=LassoParams, summary="l1-penalised least squares", paper=_GARG)(
    lambda p: LassoBaseline(**p.model_dump()))
BASELINES.register("knn", params=KnnParams, summary="k nearest neighbours", paper=_GARG)(
    lambda p: NearestNeighbours(**p.model_dump()))
BASELINES.register("averaging", summary="w = mean of y x", paper=_GARG)(lambda p: Averaging())
BASELINES.register("decision_tree", params=TreeParams, summary="greedy regression tree", paper=_GARG)(
    lambda p: TreeBaseline(**p.model_dump()))


def build_baseline(name: str, params: dict | BaseModel | None = None, where: str = "") -> Predictor:
    """The baseline ``name`` with its validated ``params`` (errors name the key under ``where``)."""
    return BASELINES.build(name, params, where=where)


def baselines_for(family: FunctionFamily) -> dict[str, Predictor]:
    """The baselines Garg et al. plot for ``family`` (their ``get_relevant_baselines``): least squares, 3-NN and
    averaging always; Lasso (alpha 0.01) for sparse linear regression; ridge with the class's noise for noisy linear
    regression (added here; its prior std is the class's scale); the tree learner at the trees' depth and unbounded
    for decision trees."""
    out: dict[str, Predictor] = {"least_squares": LeastSquares(), "knn": NearestNeighbours(), "averaging": Averaging()}
    if isinstance(family, SparseLinearRegression):
        out["lasso"] = LassoBaseline()
    if isinstance(family, NoisyLinearRegression) and family.noise_std > 0:
        out["ridge"] = Ridge(noise_std=family.noise_std, prior_std=family.scale)
    if isinstance(family, DecisionTree):
        out["decision_tree"] = TreeBaseline(max_depth=family.depth)
        out["decision_tree_unbounded"] = TreeBaseline(max_depth=None)
    return out
