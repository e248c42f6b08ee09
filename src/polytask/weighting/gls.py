"""Geometric loss strategy: minimise the geometric mean of the task losses (Chennupati et al. 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.weighting.base import State, StepContext, Weighting, register


class GLSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-12, ge=0, description="added to every loss, so a zero loss keeps the weights finite")


def gls_weights(losses: Tensor, eps: float = 0.0) -> Tensor:
    """Chennupati et al. 2019: the gradient of (prod_k L_k)^(1/K) is sum_k w_k grad L_k with
    w_k = (prod_j L_j)^(1/K) / (K L_k); computed in log space as exp(mean_j log L_j - log L_k) / K."""
    log_l = torch.log(losses + eps)
    return torch.exp(log_l.mean() - log_l) / len(losses)


@register("gls", params=GLSParams, summary="minimise the geometric mean of the losses, as detached weights",
          paper="Chennupati et al. 2019, MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss "
                "Strategy for Multi-Task Learning (CVPR workshops)")
def gls(params: GLSParams, task_names: Sequence[str]) -> Weighting:
    """GLS as a weighting: the loop minimises sum_k w_k L_k with the weights detached, whose gradient is
    exactly the gradient of the GLS loss (prod_k (L_k + eps))^(1/K) at this step (the loss value differs,
    the update does not). Stateless."""

    def init() -> State:
        return {}

    def update(state: State, losses: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        weights = gls_weights(losses.detach().double(), params.eps)
        return weights.to(losses.dtype), state

    return Weighting(init, update)
