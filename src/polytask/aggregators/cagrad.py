"""CAGrad: the update that maximises the worst task improvement within a ball around the average gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import REL_TOL, cagrad_dual, normalize
from polytask.aggregators.base import Aggregator


class CAGradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    c: float = Field(0.4, ge=0.0, description="radius of the ball around g0, as a fraction of |g0| (c = 0 is GD)")
    rescale: Literal[0, 1, 2] = Field(
        1, description="output scale of the official code: 0 none, 1 divide by 1 + c^2 (default), 2 by 1 + c"
    )
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="g0 is the mean gradient (the paper); 'sum' multiplies the update by K, as the "
        "official NYUv2 / Cityscapes code does 'to match the sum loss'",
    )


def cagrad_weights(g: np.ndarray, c: float, rescale: int = 1) -> np.ndarray:
    """Liu, Liu, Jin, Stone, Liu 2021, Conflict-Averse Gradient Descent for Multi-task Learning (Alg. 1):
    d = g0 + (c |g0| / |g_w|) g_w, where g0 = J^T 1/K and w minimises g_w . g0 + c |g0| |g_w| over the
    simplex (the dual of max_d min_i g_i . d s.t. |d - g0| <= c |g0|); then d / (1 + c^2) for rescale 1,
    d / (1 + c) for rescale 2. Returned as weights on the raw gradients (mean convention).

    The dual is solved exactly and verified by its duality gap (``cagrad_dual``, ``cagrad_kkt``) at any spread
    of the task-gradient norms (the official code's scipy SLSQP, and an absolute tolerance, stop short when the
    norms span orders of magnitude). Deliberate difference: when the dual optimum has g_w = 0 (0 is in the
    convex hull and the ball reaches the cone {d : J d >= 0}), the formula above is undefined and every d in
    ball and cone is optimal (worst-task improvement 0); we return the one closest to g0, the projection of g0
    onto that cone. There the official code's g_w / |g_w| is a direction of rounding noise and torchjd returns
    a zero update (|g_w| < norm_eps)."""
    k = len(g)
    gn, scale = normalize(g)
    w = np.full(k, 1.0 / k)
    radius = c * math.sqrt(max(float(gn.mean()), 0.0))
    if scale > 0.0 and radius > REL_TOL:
        w = w + radius * cagrad_dual(gn, radius)[1]
    return w / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


@aggregator("cagrad", params=CAGradParams,
            summary="best worst-task improvement within a ball of radius c|g0| around the mean gradient g0",
            paper="Liu, Liu, Jin, Stone, Liu 2021, Conflict-Averse Gradient Descent for Multi-task Learning",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def cagrad(params: CAGradParams, task_names: Sequence[str]) -> Aggregator:
    factor = len(task_names) if params.reduction == "sum" else 1.0
    return numpy_stateless(lambda g: factor * cagrad_weights(g, params.c, params.rescale))
