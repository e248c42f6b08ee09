"""GradNorm as a Gramian aggregator: learnable task weights that equalise the weighted gradient norms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator, gramian_numpy, weights_tensor
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext


class GradNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.5, ge=0.0, description="strength of the restoring force toward a common training "
                         "rate (the paper uses 1.5 on NYUv2; 0 equalises the gradient norms)")
    lr: float = Field(0.025, gt=0.0, description="gradient-descent step size of the task weights")


def gradnorm_step(weights: np.ndarray, norms: np.ndarray, losses: np.ndarray, initial: np.ndarray,
                  alpha: float, lr: float) -> np.ndarray:
    """Chen, Badrinarayanan, Lee, Rabinovich 2018, GradNorm (Alg. 1): one gradient step on
    L_grad = sum_i |w_i |g_i| - mean_j(w_j |g_j|) r_i^alpha|, r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)),
    the target treated as a constant; the weights are then clipped at 0 and renormalised to sum to K."""
    k = len(weights)
    rate = losses / np.where(initial > 0, initial, 1.0)
    rate = rate / rate.mean() if rate.mean() > 0 else np.ones(k)
    weighted = weights * norms
    target = weighted.mean() * rate**alpha
    new = np.maximum(weights - lr * np.sign(weighted - target) * norms, 0.0)
    return new * (k / new.sum()) if new.sum() > 0 else np.ones(k)


@aggregator("gradnorm", params=GradNormParams, summary="task weights learnt so weighted gradient norms follow "
            "each task's relative training rate",
            paper="Chen, Badrinarayanan, Lee, Rabinovich 2018, GradNorm: Gradient Normalization for Adaptive "
            "Loss Balancing in Deep Multitask Networks",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=False, weights_heads=True,
            needs_losses=True)
def gradnorm(params: GradNormParams, task_names: Sequence[str]) -> Aggregator:
    k = len(task_names)

    def init() -> State:
        return {"weights": torch.ones(k, dtype=torch.float64), "initial_losses": torch.zeros(k, dtype=torch.float64),
                "started": False}

    def update(state: State, g: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        if ctx.losses is None:
            raise ValueError("aggregator 'gradnorm': needs the task losses of the step (ctx.losses)")
        losses = ctx.losses.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(k)
        initial = losses if not state["started"] else state["initial_losses"].numpy()
        weights = state["weights"].detach().to(device="cpu", dtype=torch.float64).numpy()
        norms = np.sqrt(np.maximum(np.diag(gramian_numpy(g)), 0.0))
        new = gradnorm_step(weights, norms, losses, initial, params.alpha, params.lr)
        next_state = {"weights": torch.from_numpy(new), "initial_losses": torch.from_numpy(np.array(initial)),
                      "started": True}
        return weights_tensor(weights, g), next_state

    return Aggregator(init, update)
