"""DB-MTL: log-loss gradients, smoothed by an EMA, each rescaled to the largest norm and summed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext


class DBMTLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.9, ge=0.0, lt=1.0, description="EMA coefficient of the per-task gradients")
    beta_sigma: float = Field(0.5, ge=0.0, description="decay of the EMA coefficient: beta_t = beta / t^beta_sigma")


def dbmtl_direction(buffer: Tensor) -> Tensor:
    """Lin, Ye, Xu, Shi, Zhang, Kwok 2023, Dual-Balancing Multi-Task Learning (gradient balancing, Eq. 5):
    d = sum_k (max_j |b_j| / |b_k|) b_k for the EMA'd log-loss gradients b_k (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(buffer, dim=1, dtype=torch.float64)
    top = norms.max()
    scale = torch.where(norms > 0, top / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    scale = scale.clamp(max=torch.finfo(buffer.dtype).max)
    return (scale.to(buffer.dtype)[:, None] * buffer).sum(0)


def dbmtl_ema(buffer: Tensor, grads: Tensor, step: int, beta: float, beta_sigma: float) -> Tensor:
    """DB-MTL's EMA of the log-loss gradients (LibMTL's reference code): b <- g + beta_t (b - g),
    beta_t = beta / t^beta_sigma, t = 1, 2, ... and b = 0 before the first step."""
    return grads + (beta / step**beta_sigma) * (buffer - grads)


@aggregator("dbmtl", params=DBMTLParams, summary="EMA of log-loss gradients, each scaled to the largest norm",
            paper="Lin, Ye, Xu, Shi, Zhang, Kwok 2023, Dual-Balancing Multi-Task Learning (DB-MTL)",
            zero_only_if_zero_in_hull=False,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True, needs_losses=True)
def dbmtl(params: DBMTLParams, task_names: Sequence[str]) -> Aggregator:
    def init() -> State:
        return {"step": 0, "buffer": None}

    def update(state: State, jacobian: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        if ctx.losses is None:
            raise ValueError("aggregator 'dbmtl': needs the task losses of the step (ctx.losses)")
        losses = ctx.losses.detach().to(device=jacobian.device, dtype=jacobian.dtype).reshape(-1, 1)
        grads = jacobian / (losses + 1e-8)
        buffer = torch.zeros_like(grads) if state["buffer"] is None else state["buffer"]
        step = int(state["step"]) + 1
        buffer = dbmtl_ema(buffer, grads, step, params.beta, params.beta_sigma)
        return dbmtl_direction(buffer), {"step": step, "buffer": buffer}

    return Aggregator(init, update, "jacobian")
