"""UPGrad and DualProj: projections onto the dual cone of the task gradients (Jacobian descent)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import dual_cone_weights, normalize
from polytask.aggregators.base import Aggregator


def upgrad_weights(g: np.ndarray) -> np.ndarray:
    """Quinton & Rey 2024, Jacobian Descent for Multi-Objective Optimization (UPGrad): project each task
    gradient onto the dual cone {x : J x >= 0} and average the projections; each projection is J^T v_i with
    v_i = argmin_{v >= e_i} v^T G v, so the weights are mean_i v_i."""
    k = len(g)
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.full(k, 1.0 / k)
    return dual_cone_weights(gn, np.eye(k)).mean(axis=0)


def dualproj_weights(g: np.ndarray) -> np.ndarray:
    """Quinton & Rey 2024, Jacobian Descent for Multi-Objective Optimization (DualProj): project the mean
    gradient onto the dual cone, i.e. weights v = argmin_{v >= 1/K} v^T G v."""
    k = len(g)
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.full(k, 1.0 / k)
    return dual_cone_weights(gn, np.full((1, k), 1.0 / k))[0]


@aggregator("upgrad", summary="average of the task gradients each projected onto the dual cone of all gradients",
            paper="Quinton & Rey 2024, Jacobian Descent for Multi-Objective Optimization (UPGrad, torchjd)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=True, permutation_invariant=True, scale_equivariant=True)
def upgrad(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(upgrad_weights)


@aggregator("dualproj", summary="the mean gradient projected onto the dual cone of the task gradients",
            paper="Quinton & Rey 2024, Jacobian Descent for Multi-Objective Optimization (DualProj, torchjd)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=True, permutation_invariant=True, scale_equivariant=True)
def dualproj(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(dualproj_weights)
