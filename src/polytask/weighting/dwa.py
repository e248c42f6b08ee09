"""Dynamic Weight Average: weight tasks by how slowly their epoch loss falls (Liu, Johns & Davison 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.weighting.base import State, StepContext, Weighting, register

_BIG = 1e300  # a loss ratio over a zero loss is "very large", never inf (softmax of inf is nan)


class DWAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T; larger T gives more even weights")


def dwa_weights(last: Tensor, before: Tensor, temperature: float) -> Tensor:
    """Liu, Johns & Davison 2019 (DWA): w_k = K exp(r_k / T) / sum_i exp(r_i / T) with r_k = L_k(t-1) / L_k(t-2),
    L_k(t) the average loss of task k over epoch t."""
    tiny = torch.finfo(torch.float64).tiny
    r = (last / before.clamp_min(tiny)).clamp(max=_BIG)
    return len(r) * torch.softmax(r / temperature, dim=0)


@register("dwa", params=DWAParams, summary="w = K softmax(r / T), r_k the ratio of task k's last two epoch losses",
          paper="Liu, Johns & Davison 2019, End-to-End Multi-Task Learning with Attention (CVPR), DWA")
def dwa(params: DWAParams, task_names: Sequence[str]) -> Weighting:
    """DWA over epoch-average training losses: the state accumulates the running mean of the current epoch
    (the epoch is ``ctx.epoch``) and keeps the last two completed epoch means; weights are 1 until two epochs
    have completed, as in the paper."""
    k = len(task_names)

    def init() -> State:
        return {"epoch": -1, "sum": torch.zeros(k, dtype=torch.float64), "n": 0, "means": []}

    def update(state: State, losses: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        total, n, means = state["sum"], state["n"], list(state["means"])
        if ctx.epoch != state["epoch"] and n > 0:
            means = [*means, total / n][-2:]
            total, n = torch.zeros_like(total), 0
        weights = dwa_weights(means[1], means[0], params.temperature) if len(means) == 2 else torch.ones(k)
        new = {"epoch": ctx.epoch, "sum": total + losses.detach().double().cpu(), "n": n + 1, "means": means}
        return weights.to(losses.device, losses.dtype), new

    return Weighting(init, update)
