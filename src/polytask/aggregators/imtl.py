"""IMTL-G: the update whose projections onto every task's unit gradient are equal (impartial learning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import equal_cosine, normalize
from polytask.aggregators.base import Aggregator


class IMTLGParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    singular: Literal["cosine", "torchjd"] = Field(
        "cosine", description="generalisation when the gradients are linearly dependent (the paper's system "
        "then only has d = 0): least squares on the unit gradients, pinv(C) 1 (default, every task weighs the "
        "same), or on the raw gradients, pinv(G) |g| (torchjd; tasks weighted by their squared norm). "
        "Identical for independent gradients",
    )


def imtl_g_weights(g: np.ndarray, singular: str = "cosine") -> np.ndarray:
    """Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang 2021, Towards Impartial Multi-task Learning (IMTL-G,
    Eq. 7): the update d = J^T alpha, sum(alpha) = 1, has equal projections u_i . d on the unit gradients u_i.
    For independent gradients the paper's closed form equals alpha = G^-1 |g| / (1^T G^-1 |g|) (then
    g_i . d = |g_i| / s for every i), written here as alpha_i = c_i / |g_i| normalised, c = C^-1 1 on the cosine
    matrix C (``equal_cosine``).

    Generalisation (deliberate, the paper assumes independent gradients): with K >= rank + 2 the paper's
    equations force d = 0 whatever the gradients, a silent zero update. We take the pseudo-inverse, c = C^+ 1,
    so d is proportional to the minimum-norm least-squares solution of u_i . d = 1 (as close to equal
    projections as the gradients allow); it is 0 only when the unit gradients sum to 0 (0 in the convex hull).
    ``singular="torchjd"`` uses torchjd's pinv(G) |g| instead, the least-squares fit of g_i . d = |g_i|.
    Zero-gradient tasks get weight 0; if the weights cannot sum to 1 (their sum is ~0) they are scaled by the
    sum of their absolute values instead."""
    k = len(g)
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.full(k, 1.0 / k)
    c, norms = equal_cosine(gn)
    if singular == "torchjd":
        v = np.linalg.pinv(gn, rcond=k * float(np.finfo(np.float64).eps), hermitian=True) @ norms
    else:
        v = np.divide(c, norms, out=np.zeros(k), where=norms > 0)
    total = float(v.sum())
    mass = float(np.abs(v).sum())
    if mass == 0.0:
        return np.zeros(k)
    return v / (total if abs(total) > 1e-12 * mass else mass)


@aggregator("imtl_g", params=IMTLGParams,
            summary="equal projection of the update on every task's unit gradient, weights sum to 1",
            paper="Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang 2021, Towards Impartial Multi-task Learning "
            "(IMTL-G)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def imtl_g(params: IMTLGParams, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(lambda g: imtl_g_weights(g, params.singular))
