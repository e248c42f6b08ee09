"""Error against the number of in-context examples, with bootstrap bands (Garg et al. 2022, NeurIPS, Sec. 3 and
their ``eval.py:aggregate_metrics`` / ``plot_utils.py``), and the memorising vs generalising split (Raventós et al.
2023, "Pretraining task diversity and the emergence of non-Bayesian in-context learning for regression", NeurIPS):
a sampler that draws its functions from a fixed pool of M tasks, to compare a learner on the tasks it was trained on
with fresh draws ("ICL strategies emerge rationally", Wurgaft et al. 2025, read the same split).

A predictor is any callable ``Prompts -> B x n`` whose column i predicts y_i from the points before i (the
baselines of :mod:`polytask.icl.baselines`, or a trained model wrapped by its caller).

Deliberate differences from Garg et al.: the error is divided by the zero predictor's expected squared error
(:func:`normaliser` — d for linear regression and ReLU networks, the sparsity for sparse regression, 1 for trees,
as their plots do; with a curriculum's active dimension in place of d); the bootstrap draws come from an explicit
generator (theirs: the global RNG); the standard error is reported beside their std and bootstrap bands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError, DataError
from polytask.icl.functions import (
    DecisionTree,
    FunctionFamily,
    Params,
    SparseLinearRegression,
    SplitPrompts,
    active_dim,
    gaussian_inputs,
)
from polytask.icl.prompts import Prompts

Predictor = Callable[[Prompts], Tensor]


def normaliser(family: FunctionFamily, dim: int | None = None) -> float:
    """The zero predictor's expected squared error E[y^2] (noise left out), Garg et al.'s plot normalisation: scale^2
    times d (the active ``dim``) for linear regression and ReLU networks, times the sparsity for sparse regression,
    times 1 for decision trees."""
    if isinstance(family, DecisionTree):
        base = 1
    elif isinstance(family, SparseLinearRegression):
        base = family.sparsity
    else:
        base = active_dim(family.name, family.dim, dim)
    return float(family.scale**2 * base)


def squared_errors(predictor: Predictor, prompts: Prompts | SplitPrompts) -> Tensor:
    """(prediction - y)^2, B x n, at every position. For :class:`SplitPrompts` position i is read from the prompt of
    context points before i and query point i (one predictor call per position, as Garg et al.'s ``eval_batch``)."""
    if isinstance(prompts, Prompts):
        pred = predictor(prompts)
        if pred.shape != prompts.ys.shape:
            raise DataError(f"predictor returned shape {tuple(pred.shape)}, expected {tuple(prompts.ys.shape)}")
        return (pred.float() - prompts.ys.float()).square()
    columns = [(predictor(prompts.at(i))[:, i].float() - prompts.query.ys[:, i].float()).square()
               for i in range(prompts.query.ys.shape[1])]
    return torch.stack(columns, 1)


@dataclass(frozen=True)
class Curve:
    """Error per number of in-context examples (position i has seen i examples): the mean over prompts, its
    std and standard error, and the bootstrap interval of the mean (``low``, ``high``: the 5% and 95% quantiles of
    ``trials`` resampled means by default, as Garg et al.'s ``aggregate_metrics``)."""

    mean: list[float]
    std: list[float]
    stderr: list[float]
    low: list[float]
    high: list[float]
    prompts: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``examples`` = 0..n-1)."""
        return {"examples": list(range(len(self.mean))), "mean": self.mean, "std": self.std, "stderr": self.stderr,
                "low": self.low, "high": self.high, "prompts": self.prompts}


def summarise(errors: Tensor, generator: torch.Generator | None = None, trials: int = 1000, level: float = 0.9
              ) -> Curve:
    """The :class:`Curve` of per-prompt errors (B x n): mean, std (unbiased), standard error and the central
    ``level`` bootstrap interval of the mean over ``trials`` resamples of the prompts."""
    if errors.dim() != 2 or errors.shape[0] < 1:
        raise DataError(f"errors must be B x n with B >= 1, got {tuple(errors.shape)}")
    if not 0 < level < 1 or trials < 1:
        raise ConfigError(f"bootstrap: level must be in (0, 1) and trials >= 1, got {level} and {trials}")
    errors = errors.double()
    b = errors.shape[0]
    std = errors.std(0) if b > 1 else torch.zeros(errors.shape[1], dtype=errors.dtype)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    means = errors[torch.randint(0, b, (trials, b), generator=gen)].mean(1).sort(0).values
    lo, hi = int((1 - level) / 2 * trials), min(int((1 + level) / 2 * trials), trials - 1)
    return Curve(errors.mean(0).tolist(), std.tolist(), (std / b**0.5).tolist(), means[lo].tolist(),
                 means[hi].tolist(), b)


def error_curve(predictor: Predictor, prompts: Prompts | SplitPrompts, scale: float | None = None,
                generator: torch.Generator | None = None, trials: int = 1000) -> Curve:
    """Normalised squared error against the number of in-context examples: squared errors divided by ``scale``
    (default: the prompts' dimension d, Garg et al.'s normalisation for linear regression; pass :func:`normaliser`
    for other classes), summarised by :func:`summarise`."""
    xs = prompts.xs if isinstance(prompts, Prompts) else prompts.context.xs
    return summarise(squared_errors(predictor, prompts) / (xs.shape[-1] if scale is None else scale), generator,
                     trials)


def error_curves(predictors: Mapping[str, Predictor], prompts: Prompts | SplitPrompts, scale: float | None = None,
                 seed: int = 0, trials: int = 1000) -> dict[str, Curve]:
    """:func:`error_curve` of every predictor on the same prompts (the same bootstrap resamples for each)."""
    return {name: error_curve(p, prompts, scale, torch.Generator().manual_seed(seed), trials)
            for name, p in predictors.items()}


# ---------------------------------------------------------------- memorising vs generalising (Raventós et al. 2023)


class TaskPool:
    """A function class restricted to a fixed pool of ``size`` functions drawn once from ``family`` with ``seed``
    (Raventós et al. 2023's task diversity M): each prompt picks one pool member uniformly (from the sampling
    generator) and fresh inputs; label noise stays fresh. Implements :class:`polytask.icl.prompts.FunctionClass`.

    Difference from Raventós et al.: the pool is drawn at the family's full dimension once (a curriculum's ``dim``
    only zeroes the inputs' last coordinates)."""

    def __init__(self, family: FunctionFamily, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ConfigError(f"task pool of {family.name!r}: size must be >= 1, got {size}")
        self.family, self.size, self.seed = family, size, seed
        self.name, self.dim = f"{family.name}_pool{size}", family.dim
        self.params: Params = family.draw(torch.Generator().manual_seed(seed), size)

    @property
    def ws(self) -> Tensor | None:
        """The pool's weight vectors (M x d) for linear classes (what :class:`baselines.PoolPosterior` reads)."""
        return self.family.weights(self.params)

    def pick(self, generator: torch.Generator, batch: int) -> tuple[Tensor, Params]:
        """``batch`` pool indices and their functions' parameters."""
        idx = torch.randint(0, self.size, (batch,), generator=generator)
        return idx, {k: v[idx] for k, v in self.params.items()}

    def sample(self, generator: torch.Generator, batch: int, n_points: int, dim: int | None = None) -> Prompts:
        """``batch`` prompts, each of one pool member at fresh inputs."""
        active = active_dim(self.name, self.dim, dim)
        _, params = self.pick(generator, batch)
        xs = gaussian_inputs(generator, batch, n_points, self.dim, active)
        return Prompts(xs, self.family.labels(generator, params, xs), self.family.weights(params))


def seen_and_unseen(predictors: Mapping[str, Predictor], pool: TaskPool, generator: torch.Generator, batch: int,
                    n_points: int, scale: float | None = None, trials: int = 1000) -> dict[str, dict[str, Curve]]:
    """Error curves on tasks from the training pool (``seen``) and on fresh draws of its family (``unseen``): a
    memorising learner (the pool posterior) is good only on ``seen``, a generalising one (ridge) on both
    (Raventós et al. 2023, Fig. 1)."""
    seen = pool.sample(generator, batch, n_points)
    unseen = pool.family.sample(generator, batch, n_points)
    norm = normaliser(pool.family) if scale is None else scale
    return {"seen": error_curves(predictors, seen, norm, trials=trials),
            "unseen": error_curves(predictors, unseen, norm, trials=trials)}
