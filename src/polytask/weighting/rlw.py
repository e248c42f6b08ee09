"""Random loss weighting: fresh random weights every step (Lin et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel
from torch import Tensor

from polytask.weighting.base import State, StepContext, Weighting, register


def rlw_weights(k: int, generator: torch.Generator) -> Tensor:
    """Lin et al. 2022 (RLW, normal sampling): w = softmax(z), z ~ N(0, I_K), scaled by K (see :func:`rlw`)."""
    z = torch.randn(k, generator=generator, dtype=torch.float64)
    return k * torch.softmax(z, dim=0)


@register("rlw", summary="w = K softmax(z), z ~ N(0, I) drawn afresh every step",
          paper="Lin et al. 2022, Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task "
                "Learning (TMLR)")
def rlw(params: BaseModel, task_names: Sequence[str]) -> Weighting:
    """RLW with standard-normal logits. The paper's weights sum to 1; ours are multiplied by K so they sum to K
    like ``equal`` (mean weight 1): the same method at a K-times larger learning rate, comparable with the
    other weightings at one learning rate. The draws come from ``ctx.generator`` (seeded from run seed and
    step, so a resumed run draws the same); without one, from a generator seeded with the step alone."""
    k = len(task_names)

    def init() -> State:
        return {}

    def update(state: State, losses: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(ctx.step)
        return rlw_weights(k, gen).to(losses.device, losses.dtype), state

    return Weighting(init, update)
