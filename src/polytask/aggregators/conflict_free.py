"""ConFIG: the conflict-free direction with equal cosine to every task gradient, rescaled by projection."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import REL_TOL, normalize
from polytask.aggregators.base import Aggregator


def config_weights(g: np.ndarray) -> np.ndarray:
    """Liu, Chu, Thuerey 2024, ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    (Eq. 2-3, equal weights, projection length): y = pinv(U) 1 for the unit gradients U = N J (N = diag(1/|g_i|)),
    g_u = y / |y|, d = (sum_i g_i . g_u) g_u. On the Gramian, with the cosine matrix C = N G N and c = C^+ 1:
    y = J^T N c, |y|^2 = c^T C c, sum_i g_i . y = 1^T G N c, so w = N c (1^T G N c) / (c^T C c). Zero-gradient
    tasks are left out (their unit vector is 0, as the official nan_to_num does)."""
    k = len(g)
    gn, scale = normalize(g)
    w = np.zeros(k)
    live = np.flatnonzero(np.diag(gn) > REL_TOL) if scale > 0.0 else np.zeros(0, dtype=int)
    if not len(live):
        return w
    sub = gn[np.ix_(live, live)]
    norms = np.sqrt(np.diag(sub))
    cos = sub / np.outer(norms, norms)
    c = np.linalg.lstsq(cos, np.ones(len(live)), rcond=1e-12)[0]
    v = c / norms
    yy = float(c @ cos @ c)
    if yy > REL_TOL:
        w[live] = v * float(sub.sum(axis=0) @ v) / yy
    return w


@aggregator("config", summary="direction with equal cosine to every task gradient, length = sum of projections",
            paper="Liu, Chu, Thuerey 2024, ConFIG: Towards Conflict-free Training of Physics Informed Neural "
            "Networks",
            non_conflicting=False, non_conflicting_if_independent=True, permutation_invariant=True,
            scale_equivariant=True)
def config(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(config_weights)
