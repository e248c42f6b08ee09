"""Adam over explicit state, for the few scalars a weighting learns itself (UW, IMTL-L, FAMO logits).

The state is plain float64 tensors and an int, so it checkpoints with the run; the update is the one
``torch.optim.Adam`` applies (same bias correction, same L2 ``weight_decay`` added to the gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from polytask.weighting.base import State, StepContext, Weighting

BETAS = (0.9, 0.999)
EPS = 1e-8


def adam_init(param: Tensor) -> State:
    """Zero moments for a parameter shaped like ``param``."""
    return {"m": torch.zeros_like(param), "v": torch.zeros_like(param), "t": 0}


def adam_step(param: Tensor, grad: Tensor, state: State, lr: float, weight_decay: float = 0.0) -> tuple[Tensor, State]:
    """One Adam step (Kingma & Ba 2015), exactly as ``torch.optim.Adam``: returns the new parameter and state."""
    b1, b2 = BETAS
    g = grad + weight_decay * param
    t = state["t"] + 1
    m = torch.lerp(state["m"], g, 1 - b1)
    v = state["v"] * b2 + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2**t) ** 0.5 + EPS
    return param - (lr / (1 - b1**t)) * m / denom, {"m": m, "v": v, "t": t}


S_BOUND = 40.0  # |s_k| cap: keeps exp(±s) finite in float32 even after many steps of a zero loss


def learned_scales(k: int, init: float, lr: float, weights: Callable[[Tensor], Tensor],
                   grad: Callable[[Tensor, Tensor], Tensor]) -> Weighting:
    """A weighting with one learned scalar s_k per task (UW, IMTL-L): the step's weights are
    ``weights(s)``, then s takes one Adam step on the analytic ``grad(s, losses)``."""

    def init_state() -> State:
        s = torch.full((k,), float(init), dtype=torch.float64)
        return {"s": s, "adam": adam_init(s)}

    def update(state: State, losses: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        s = state["s"]
        s_new, adam = adam_step(s, grad(s, losses.detach().double().cpu()), state["adam"], lr)
        return weights(s).to(losses.device, losses.dtype), {"s": s_new.clamp(-S_BOUND, S_BOUND), "adam": adam}

    return Weighting(init_state, update)
