"""ConFIG: the conflict-free direction with equal cosine to every task gradient, rescaled by projection."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import REL_TOL, equal_cosine, normalize
from polytask.aggregators.base import Aggregator


def config_weights(g: np.ndarray) -> np.ndarray:
    """Liu, Chu, Thuerey 2024, ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    (Eq. 2-3, equal weights, projection length): y = pinv(U) 1 for the unit gradients U = N J (N = diag(1/|g_i|)),
    g_u = y / |y|, d = (sum_i g_i . g_u) g_u. On the Gramian, with the cosine matrix C = N G N and c = C^+ 1
    (``equal_cosine``): y = J^T N c, |y|^2 = c^T C c, sum_i g_i . y = 1^T G N c, so
    w = N c (1^T G N c) / (c^T C c). Zero-gradient tasks are left out (their unit vector is 0, as the official
    nan_to_num does). The direction is 0 only when the unit gradients sum to 0 (then 0 is in their convex hull
    and g_u is undefined): y = 0 is never the result of rounding (the pseudo-inverse is taken on the unit-diagonal
    C of a float64 Gramian)."""
    k = len(g)
    gn, scale = normalize(g)
    w = np.zeros(k)
    if scale == 0.0:
        return w
    c, norms = equal_cosine(gn)
    live = np.flatnonzero(norms > 0)
    v = c[live] / norms[live]
    sub = gn[np.ix_(live, live)]
    cos = sub / np.outer(norms[live], norms[live])
    projected = cos @ c[live]  # the projection of 1 onto C's range: U y
    if float(projected @ projected) <= REL_TOL * len(live):  # sum of the unit gradients ~ 0: no direction
        return w
    w[live] = v * float(sub.sum(axis=0) @ v) / float(c[live] @ projected)
    return w


@aggregator("config", summary="direction with equal cosine to every task gradient, length = sum of projections",
            paper="Liu, Chu, Thuerey 2024, ConFIG: Towards Conflict-free Training of Physics Informed Neural "
            "Networks",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, non_conflicting_if_independent=True, permutation_invariant=True,
            scale_equivariant=True)
def config(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(config_weights)
