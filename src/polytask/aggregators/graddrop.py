"""GradDrop: per coordinate, keep only the gradients of one sign, chosen with probability = sign purity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext


class GradDropParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    leak: float = Field(0.0, ge=0.0, le=1.0, description="fraction of every gradient kept whatever the mask "
                        "(the paper's leak l; 0 is pure GradDrop, 1 the plain sum)")


def graddrop_direction(jacobian: Tensor, uniform: Tensor, leak: float) -> Tensor:
    """Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov 2020, Just Pick a Sign: Optimizing Deep Multitask
    Models with Gradient Sign Dropout (Alg. 1): purity P = (1 + sum_i g_i / sum_i |g_i|) / 2 per coordinate;
    with U ~ Uniform[0, 1) per coordinate, task i keeps g_i where (P > U and g_i > 0) or (P < U and g_i < 0);
    the update is sum_i (leak + (1 - leak) M_i) g_i. P is computed in float64 (and U drawn in float64 by the
    aggregator), so a float32 and a float64 Jacobian get the same mask."""
    total, mass = jacobian.sum(0, dtype=torch.float64), jacobian.abs().sum(0, dtype=torch.float64)
    ratio = torch.where(mass > 0, total / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(mass))
    purity = (0.5 * (1.0 + ratio)).to(uniform.dtype)
    keep = ((purity > uniform) & (jacobian > 0)) | ((purity < uniform) & (jacobian < 0))
    return (jacobian * (leak + (1.0 - leak) * keep.to(jacobian.dtype))).sum(0)


@aggregator("graddrop", params=GradDropParams,
            summary="per coordinate, drop the gradients of the sign chosen against its purity",
            paper="Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov 2020, Just Pick a Sign: Optimizing Deep "
            "Multitask Models with Gradient Sign Dropout (GradDrop)",
            zero_only_if_zero_in_hull=False,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True, stochastic=True)
def graddrop(params: GradDropParams, task_names: Sequence[str]) -> Aggregator:
    def init() -> State:
        return {}

    def update(state: State, jacobian: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        # float64 draws whatever the gradients' dtype: the same seed gives the same mask in float32 and float64
        gen, p = ctx.generator, jacobian.shape[1]
        if gen is None:
            uniform = torch.rand(p, device=jacobian.device, dtype=torch.float64)
        else:
            uniform = torch.rand(p, generator=gen, device=gen.device, dtype=torch.float64).to(jacobian.device)
        return graddrop_direction(jacobian, uniform, params.leak), state

    return Aggregator(init, update, "jacobian")
