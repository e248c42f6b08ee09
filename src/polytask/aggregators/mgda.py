"""MGDA: the minimum-norm point of the convex hull of the task gradients (a common descent direction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator, gramian_numpy, weights_tensor
from polytask.aggregators._solvers import min_norm_simplex, normalize
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext


class MGDAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        "none",
        description="gradient normalisation before the min-norm solve (Sener & Koltun's code): 'none' is exact "
        "MGDA; 'l2' divides each gradient by its norm, 'loss' by its task loss, 'loss+' by both. The weights "
        "found on the normalised gradients are applied to the raw ones, as in their code",
    )


def mgda_weights(g: np.ndarray, normalizers: np.ndarray | None = None) -> np.ndarray:
    """Weights w on the simplex minimising |J^T w|^2 = w^T G w (Désidéri 2012, Multiple-gradient descent
    algorithm; Sener & Koltun 2018, Multi-Task Learning as Multi-Objective Optimization), solved exactly.

    With ``normalizers`` n_k the QP is solved on D G D, D = diag(1/n_k) (zero-gradient tasks keep 0), and the
    weights are returned for the raw gradients, as Sener & Koltun's code does.
    """
    k = len(g)
    if normalizers is not None:
        d = np.where(normalizers > 0, 1.0 / np.where(normalizers > 0, normalizers, 1.0), 0.0)
        g = g * d[:, None] * d[None, :]
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.full(k, 1.0 / k)
    return min_norm_simplex(gn)


def _normalizers(kind: str, g: np.ndarray, ctx: StepContext) -> np.ndarray | None:
    """Per-task gradient normalisers of Sener & Koltun's ``gradient_normalizers``."""
    if kind == "none":
        return None
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    if kind == "l2":
        return norms
    if ctx.losses is None:
        raise ValueError(f"aggregator 'mgda': normalization {kind!r} needs the task losses (ctx.losses)")
    losses = ctx.losses.detach().to(device="cpu").double().numpy()
    return losses if kind == "loss" else losses * norms


@aggregator("mgda", params=MGDAParams, summary="min-norm point of the convex hull of the task gradients",
            paper="Désidéri 2012 (MGDA); Sener & Koltun 2018, Multi-Task Learning as Multi-Objective Optimization",
            zero_only_if_zero_in_hull=True,
            non_conflicting=True, permutation_invariant=True, scale_equivariant=True, weights_heads=True)
def mgda(params: MGDAParams, task_names: Sequence[str]) -> Aggregator:
    def init() -> State:
        return {}

    def update(state: State, g: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        gram = gramian_numpy(g)
        return weights_tensor(mgda_weights(gram, _normalizers(params.normalization, gram, ctx)), g), state

    return Aggregator(init, update)
