"""FAMO: decrease every task loss at the same log rate, with O(1) extra cost per step (Liu et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.weighting._adam import adam_init, adam_step
from polytask.weighting.base import State, StepContext, Weighting, register


class FAMOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(0.025, gt=0, description="Adam learning rate of the task logits xi (official code: w_lr)")
    gamma: float = Field(0.01, ge=0, description="weight decay of the task logits xi (official code: gamma)")
    eps: float = Field(1e-8, gt=0, description="added to every loss before its log (official code: 1e-8)")
    min_loss: float = Field(0.0, description="a lower bound of every task loss (official code: min_losses, 0)")


def famo_weights(xi: Tensor, gaps: Tensor) -> Tensor:
    """Liu et al. 2023 (FAMO): the step minimises sum_k z_k log D_k / c with z = softmax(xi), D_k the loss gap
    L_k - L_k* + eps and c = sum_k z_k / D_k detached; its gradient is sum_k w_k grad L_k, w_k = z_k / (c D_k)."""
    q = torch.softmax(xi, dim=0) / gaps
    return q / q.sum()


def famo_logit_grad(xi: Tensor, gaps_before: Tensor, gaps_after: Tensor) -> Tensor:
    """Liu et al. 2023 (FAMO, Algorithm 1): the gradient of the logits is J_z(xi)^T delta, with
    delta_k = log D_k(t) - log D_k(t+1) the log-loss decrease of task k over the step and J_z the softmax
    Jacobian: (J_z^T delta)_k = z_k (delta_k - z . delta)."""
    delta = torch.log(gaps_before) - torch.log(gaps_after)
    z = torch.softmax(xi, dim=0)
    return z * (delta - (z * delta).sum())


@register("famo", params=FAMOParams, summary="task logits learned so all log-losses fall at one rate",
          paper="Liu, Liu, Jin, Stone & Liu 2023, FAMO: Fast Adaptive Multitask Optimization (NeurIPS)")
def famo(params: FAMOParams, task_names: Sequence[str]) -> Weighting:
    """FAMO as a weighting. The loop minimises sum_k w_k L_k with detached w_k = z_k / (c D_k), whose gradient
    equals that of the paper's log-loss objective sum_k z_k log D_k / c (the weights sum to 1, as in the
    official code). ``after_step`` receives the losses recomputed on the same batch after the optimiser
    step and takes one Adam step (with L2 weight decay gamma, as the official code) on the logits xi along
    J_z^T delta: tasks whose log-loss fell least get more weight. D_k = max(L_k - min_loss, 0) + eps, with
    min_loss 0 by default (the official code's ``min_losses``). The official defaults are lr 0.025, gamma 0.01
    (its benchmarks use gamma 0.001 to 0.01, its toy example 0). Without ``after_step`` the logits stay 0."""
    k = len(task_names)

    def gaps(losses: Tensor) -> Tensor:
        return (losses.detach().double().cpu() - params.min_loss).clamp_min(0.0) + params.eps

    def init() -> State:
        xi = torch.zeros(k, dtype=torch.float64)
        return {"xi": xi, "adam": adam_init(xi), "before": torch.ones(k, dtype=torch.float64)}

    def update(state: State, losses: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        before = gaps(losses)
        weights = famo_weights(state["xi"], before)
        return weights.to(losses.device, losses.dtype), {**state, "before": before}

    def after_step(state: State, new_losses: Tensor, ctx: StepContext) -> State:
        grad = famo_logit_grad(state["xi"], state["before"], gaps(new_losses))
        xi, adam = adam_step(state["xi"], grad, state["adam"], params.lr, params.gamma)
        return {**state, "xi": xi, "adam": adam}

    return Weighting(init, update, after_step)
