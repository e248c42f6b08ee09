"""CoBa: balance the convergence of the tasks' validation losses and damp diverging tasks (Gong et al. 2024).

Two forms (``form``). ``paper`` (default) follows the equations of the paper. ``official`` follows the authors'
code (codefuse-ai/MFTCoder, ``CoBaStatus.compute_per_task_weight`` in ``mftcoder_accelerate/src/utils/
loss_utils.py``), which differs in three places:

- alpha_max(t) is the slope of the pointwise largest normalised validation loss over the window
  (``max_i L_i(s)``, then the fit), where the paper takes the largest slope ``max_i alpha_i(t)``;
- the divergence factor is not capped at 1 (the paper's ``min(., 1)`` is missing), so it can exceed 1;
- the mixed score goes through a final ``softmax(K * w)``, and when any weight falls below 1/(10K) every weight
  becomes ``0.9 w + 1/(10K)`` (a floor that keeps a task from being starved).

Both forms share what the official code does beside the equations and polytask keeps: losses normalised by an
early reading (the official code by a full validation pass before training, polytask by the first reading), an
ordinary least-squares slope against the reading index. Not copied from the official code: its ACS window starts
at column max(0, t - N) of a slope list that itself starts at warm-up, so it holds N - warmup + 1 slopes once
t > N; both forms here use the last N slopes, as the paper does. Either way polytask multiplies the weights
(which sum to 1) by K, so that warm-up is exactly ``equal``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.errors import ConfigError
from polytask.weighting.base import State, StepContext, Weighting, register

_TINY = torch.finfo(torch.float64).tiny


class CoBaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warmup_steps: int = Field(100, ge=0, description="steps with equal weights before CoBa starts adjusting them")
    window: int = Field(200, ge=2, description="N: validation losses in the slope fit, and slopes in the ACS sum")
    tau: float = Field(5.0, gt=0, description="temperature of the divergence factor")
    val_every: int = Field(1, ge=1, description="steps between validation-loss readings (and weight updates)")
    form: Literal["paper", "official"] = Field(
        "paper", description="paper: the paper's equations; official: the authors' code (alpha_max from the "
        "largest loss curve, uncapped divergence factor, final softmax over K*w, weight floor 1/(10K))")


def convergence_slopes(history: Tensor) -> Tensor:
    """Gong et al. 2024, Eq. 2: the least-squares slope alpha_i of each task's last N normalised validation
    losses (the rows of ``history``, one per reading) against the reading index."""
    x = torch.arange(history.shape[0], dtype=history.dtype)
    x = x - x.mean()
    return (x[:, None] * (history - history.mean(dim=0))).sum(dim=0) / (x * x).sum()


def relative_convergence(alpha: Tensor) -> Tensor:
    """Gong et al. 2024, Eq. 3 (RCS): softmax_i(K alpha_i / sum_j |alpha_j|); a task converging more slowly
    than the others (larger slope) gets more weight."""
    return torch.softmax(len(alpha) * alpha / alpha.abs().sum().clamp_min(_TINY), dim=0)


def absolute_convergence(slopes: Tensor) -> Tensor:
    """Gong et al. 2024, Eq. 4 (ACS): softmax_i(-N alpha_i(t) / sum_{j=t-N+1..t} |alpha_i(j)|) over the last N
    slopes (rows of ``slopes``); a task whose own slope turns upwards (diverges) gets less weight."""
    n = slopes.shape[0]
    return torch.softmax(-n * slopes[-1] / slopes.abs().sum(dim=0).clamp_min(_TINY), dim=0)


def largest_loss_slope(history: Tensor) -> Tensor:
    """The official code's alpha_max(t): the slope (Eq. 2) of the pointwise largest normalised validation loss
    ``max_i L_i(s)`` over the window (rows of ``history``); the paper takes ``max_i alpha_i(t)`` instead."""
    return convergence_slopes(history.max(dim=1).values[:, None])[0]


def divergence_factor(alpha_max: Tensor, tau: float, cap: bool = True) -> Tensor:
    """Gong et al. 2024, Eq. 5 (DF): min(t softmax_t(-tau t alpha_max(t) / sum_{j<=t} |alpha_max(j)|), 1), the
    softmax over the readings j = 1..t since warm-up of the largest slope alpha_max(j) = max_i alpha_i(j).
    It is ~1 while tasks converge as before and falls towards 0 when the largest slope rises (a task diverges).
    ``cap=False`` drops the ``min(., 1)``, as the official code does (DF can then exceed 1)."""
    t = alpha_max.shape[0]
    logits = -tau * t * alpha_max / alpha_max.abs().sum().clamp_min(_TINY)
    df = t * torch.softmax(logits, dim=0)[-1]
    return df.clamp(max=1.0) if cap else df


def coba_weights(slopes: Tensor, alpha_max: Tensor, tau: float,
                 form: Literal["paper", "official"] = "paper") -> Tensor:
    """Gong et al. 2024, Eq. 6: w_i = DF RCS_i + (1 - DF) ACS_i (sums to 1).

    ``form="official"``: as the authors' code, DF uncapped, then ``softmax(K w)``, and where any weight is below
    1/(10K) every weight becomes ``0.9 w + 1/(10K)`` (still summing to 1)."""
    official = form == "official"
    df = divergence_factor(alpha_max, tau, cap=not official)
    mixed = df * relative_convergence(slopes[-1]) + (1 - df) * absolute_convergence(slopes)
    if not official:
        return mixed
    k = mixed.shape[0]
    weights = torch.softmax(k * mixed, dim=0)
    floor = 1 / (10 * k)
    return weights * (1 - k * floor) + floor if bool((weights < floor).any()) else weights


@register("coba", params=CoBaParams, needs_val=True,
          summary="weights from the slopes of the validation losses: balance convergence, damp divergence",
          paper="Gong et al. 2024, CoBa: Convergence Balancer for Multitask Finetuning of Large Language Models "
                "(EMNLP)")
def coba(params: CoBaParams, task_names: Sequence[str]) -> Weighting:
    """CoBa. Every ``val_every`` steps it reads the K validation losses (``ctx.val_losses()``), normalised by
    the first reading as in the official code, and keeps the last ``window`` of them; after ``warmup_steps``
    each reading refits the slopes and recomputes the weights (Eq. 2-6, or the official code's form, see the
    module docstring), which hold until the next reading. The paper's weights sum to 1; ours are multiplied by
    K so warm-up is exactly ``equal``."""
    k = len(task_names)

    def init() -> State:
        empty = torch.zeros(0, k, dtype=torch.float64)
        return {"first": torch.zeros(0, dtype=torch.float64), "history": empty, "slopes": empty.clone(),
                "alpha_max": torch.zeros(0, dtype=torch.float64), "weights": torch.ones(k, dtype=torch.float64)}

    def read(state: State, ctx: StepContext) -> State:
        if ctx.val_losses is None:
            raise ConfigError("method 'coba' needs validation losses every `val_every` steps, but the training "
                              "loop gave none (ctx.val_losses is None): give the suite a validation split")
        val = ctx.val_losses().detach().double().cpu().reshape(k)
        first = state["first"] if state["first"].numel() else val
        scale = torch.where(first > 0, first, torch.ones_like(first))
        history = torch.cat([state["history"], (val / scale)[None]])[-params.window:]
        new = {**state, "first": first, "history": history}
        if ctx.step < params.warmup_steps or history.shape[0] < 2:
            return new
        alpha = convergence_slopes(history)
        slopes = torch.cat([state["slopes"], alpha[None]])[-params.window:]
        largest = largest_loss_slope(history) if params.form == "official" else alpha.max()
        alpha_max = torch.cat([state["alpha_max"], largest[None]])
        return {**new, "slopes": slopes, "alpha_max": alpha_max,
                "weights": k * coba_weights(slopes, alpha_max, params.tau, params.form)}

    def update(state: State, losses: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        if ctx.step % params.val_every == 0:
            state = read(state, ctx)
        weights = state["weights"] if ctx.step >= params.warmup_steps else torch.ones(k, dtype=torch.float64)
        return weights.to(losses.device, losses.dtype), state

    return Weighting(init, update)
