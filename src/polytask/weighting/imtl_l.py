"""IMTL-L: learn a loss scale per task so that the scaled losses become equal (Liu et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.weighting._adam import learned_scales
from polytask.weighting.base import Weighting, register


class IMTLLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the log-scales s_k")
    init: float = Field(0.0, description="initial log-scale s_k of every task (weights start at exp(init))")


def imtl_l_weights(s: Tensor) -> Tensor:
    """Liu et al. 2021 (IMTL-L): the scale e^{s_k} of the scaled loss e^{s_k} L_k - s_k."""
    return torch.exp(s)


def imtl_l_grad(s: Tensor, losses: Tensor) -> Tensor:
    """Liu et al. 2021 (IMTL-L): d/ds_k [e^{s_k} L_k - s_k] = e^{s_k} L_k - 1; zero when e^{s_k} L_k = 1."""
    return torch.exp(s) * losses - 1.0


@register("imtl_l", params=IMTLLParams, summary="learned loss scales e^{s_k} driving every scaled loss to 1",
          paper="Liu et al. 2021, Towards Impartial Multi-task Learning (ICLR), IMTL-L")
def imtl_l(params: IMTLLParams, task_names: Sequence[str]) -> Weighting:
    """IMTL-L: minimise sum_k e^{s_k} L_k - s_k over the s_k as well; at the optimum every scaled loss
    e^{s_k} L_k equals 1, so no task dominates by its loss scale. The s_k are learned with their own Adam
    on the analytic gradient, one step per training step, after the weights are read."""
    return learned_scales(len(task_names), params.init, params.lr, imtl_l_weights, imtl_l_grad)
