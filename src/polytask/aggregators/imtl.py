"""IMTL-G: the update whose projections onto every task's unit gradient are equal (impartial learning)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import REL_TOL, normalize
from polytask.aggregators.base import Aggregator


def imtl_g_weights(g: np.ndarray) -> np.ndarray:
    """Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang 2021, Towards Impartial Multi-task Learning (IMTL-G,
    Eq. 7): with D = [g_1 - g_2, ..., g_1 - g_K], U = [u_1 - u_2, ..., u_1 - u_K] (u = unit gradients),
    alpha_{2:K} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:K}. On the Gramian with A = G diag(1/|g|)
    (A_ij = g_i . u_j): D U^T = E^T A E and g_1 U^T = e_1^T A E, E = [e_1 - e_j]_j. Solved by least squares
    (minimum-norm) so dependent gradients stay finite; zero-gradient tasks get weight 0."""
    k = len(g)
    gn, scale = normalize(g)
    w = np.zeros(k)
    live = np.flatnonzero(np.diag(gn) > REL_TOL) if scale > 0.0 else np.zeros(0, dtype=int)
    if len(live) <= 1:
        w[live] = 1.0
        return w if len(live) else np.full(k, 1.0 / k)
    sub = gn[np.ix_(live, live)]
    a = sub / np.sqrt(np.diag(sub))[None, :]
    ae = a[:, :1] - a[:, 1:]
    rest = np.linalg.lstsq((ae[:1] - ae[1:]).T, ae[0], rcond=1e-12)[0]
    w[live] = np.concatenate([[1.0 - rest.sum()], rest])
    return w


@aggregator("imtl_g", summary="equal projection of the update on every task's unit gradient, weights sum to 1",
            paper="Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang 2021, Towards Impartial Multi-task Learning "
            "(IMTL-G)",
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def imtl_g(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(imtl_g_weights)
