"""Uncertainty weighting: learn one log-variance per task (Kendall, Gal & Cipolla 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.weighting._adam import learned_scales
from polytask.weighting.base import Weighting, register


class UWParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the log-variances s_k")
    init: float = Field(0.0, description="initial log-variance s_k of every task (weights start at exp(-init))")


def uw_weights(s: Tensor) -> Tensor:
    """Kendall et al. 2018: the loss weights exp(-s_k) = 1/sigma_k^2 of the objective sum_k exp(-s_k) L_k + s_k."""
    return torch.exp(-s)


def uw_grad(s: Tensor, losses: Tensor) -> Tensor:
    """Kendall et al. 2018: d/ds_k [exp(-s_k) L_k + s_k] = 1 - exp(-s_k) L_k; zero at s_k = log L_k."""
    return 1.0 - torch.exp(-s) * losses


@register("uw", params=UWParams, summary="learned homoscedastic uncertainty: w_k = exp(-s_k), s_k -> log L_k",
          paper="Kendall, Gal & Cipolla 2018, Multi-Task Learning Using Uncertainty to Weigh Losses (CVPR)")
def uw(params: UWParams, task_names: Sequence[str]) -> Weighting:
    """UW in log-variance form s_k = log sigma_k^2, objective sum_k exp(-s_k) L_k + s_k.

    This is twice the paper's regression likelihood sum_k L_k / (2 sigma_k^2) + log sigma_k (the LibMTL form
    0.5 exp(-s_k) L_k + 0.5 s_k): same optimum s_k = log L_k, and Adam is invariant to the factor 2 in the
    s-gradient; the weights are exp(-s_k), so a task at its optimum weighs 1/L_k. The s_k are learned here
    with their own Adam on the analytic gradient, one step per training step, after the weights are read.
    """
    return learned_scales(len(task_names), params.init, params.lr, uw_weights, uw_grad)
