"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual learning through synaptic intelligence", ICML;
Eq. 3-5).

While experience μ trains, every parameter accumulates its path integral ``ω_k = −Σ_t g_k(t) Δθ_k(t)`` (Eq. 3, the
sum over optimiser steps of minus the gradient times the step's parameter change: how much the parameter's motion
lowered the loss). At the experience's end ``Ω_k ← max(0, Ω_k + ω_k / (Δ_k² + ξ))`` with Δ_k the parameter's total
change over the experience (Eq. 5), and ``θ̃`` becomes the current weights; later experiences minimise
``L(θ) + c Σ_k Ω_k (θ_k − θ̃_k)²`` (Eq. 4).

What "gradient" means: g is the gradient of the experience's task losses only (the paper's ∂L/∂θ of the task; the
official code's ``unreg_grads``), i.e. what the joint method set, read before any strategy's extra loss (this
penalty, a composed partner's replay or distillation term) is added; Δθ is the optimiser's actual update (with
momentum, Adam, the penalty's pull and any gradient projection), read after the step. The clamp at zero is the
official code's (``tf.nn.relu`` on the accumulated Ω), not in the paper's equations: a parameter whose motion raised
the loss gets no importance rather than a negative one. Avalanche's SynapticIntelligencePlugin reads the gradient of
the regularised loss, clamps Ω from above at 0.001 (and not from below), and halves its penalty (λ/2 Σ Ω (θ − θ̃)²).

State: Ω (its non-zero entries) and θ̃, the current experience's ω, its starting weights, and the last step's
(g, θ before the step) until the step's change is known (the next step, or the experience's end), so a run stopped
between steps resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.continual.strategies.regularization import Params, Quadratic, nonzero, snapshot, to_device, trainable
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream


def path_step(omega: Params, grad: Params, before: Params, after: Params) -> Params:
    """One step of Eq. 3: ``ω ← ω − g ⊙ (θ_after − θ_before)``."""
    return {n: omega[n] - grad[n] * (after[n] - before[n]) if n in grad else omega[n] for n in omega}


def consolidate(big_omega: Params, omega: Params, start: Params, end: Params, xi: float) -> Params:
    """Eq. 5 with the official clamp: ``Ω ← max(0, Ω + ω / ((θ_end − θ_start)² + ξ))`` for the weights that trained
    (in ``end``); the importance of a weight frozen since (absent from ``end``) is kept as it was."""
    out = {n: v for n, v in big_omega.items() if n not in end}
    out.update({n: torch.clamp(big_omega.get(n, torch.zeros_like(w)) + w / ((end[n] - start[n]).pow(2) + xi), min=0)
                for n, w in omega.items() if n in end})
    return out


class SIParams(BaseModel):
    """Parameters of ``si``."""

    model_config = ConfigDict(extra="forbid")
    c: float = Field(1.0, ge=0, description="strength of the penalty c Σ Ω (θ − θ̃)²")
    xi: float = Field(1e-3, gt=0, description="ξ: damping of Ω = ω / (Δ² + ξ) (the official code: 1e-3 on split "
                    "CIFAR-10, 0.1 on permuted MNIST)")


class SI(Quadratic):
    """Synaptic Intelligence: importance from each parameter's contribution to the drop of the loss."""

    name = "si"

    def __init__(self, params: SIParams) -> None:
        super().__init__(params.c)
        self.params = params
        self.omega: Params = {}
        self.start: Params = {}
        self.pending: dict[str, Params] | None = None

    def init(self, run: Any) -> None:
        # the first experience's job, or weights that train from this experience on (a strategy that unfreezes new
        # ones, as incremental rank updates do); a resumed job then loads its saved state over this
        for n, v in snapshot(run.model).items():
            if n not in self.start:
                self.start[n], self.omega[n] = v, torch.zeros_like(v)

    def _flush(self, model: nn.Module) -> None:
        """Add the last step's term now that its parameter change is known."""
        if self.pending is not None:
            after = {n: p.detach() for n, p in trainable(model).items()}
            device = next(iter(after.values())).device
            pending = to_device(self.pending, device)
            self.omega = path_step(to_device(self.omega, device), pending["grad"], pending["before"], after)
            self.pending = None

    def on_step(self, run: Any, step: Any) -> None:
        self._flush(run.model)

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        params = trainable(run.model)
        # the method's gradient (the task losses): no hook's extra term has been added yet
        self.pending = {"grad": {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None},
                        "before": {n: p.detach().clone() for n, p in params.items() if p.grad is not None}}
        return super().extra_loss(run, step)

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        self._flush(model)
        now = snapshot(model)
        big_omega = self.terms[0][0] if self.terms else {}
        importance = nonzero(consolidate(to_device(big_omega, device), to_device(self.omega, device),
                                         to_device(self.start, device), now, self.params.xi))
        self.terms = [(importance, snapshot(model, list(importance)))] if importance else []
        self.start = now
        self.omega = {n: torch.zeros_like(v) for n, v in now.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"omega": self.omega, "start": self.start, "pending": self.pending}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.omega, self.start, self.pending = state["omega"], state["start"], state["pending"]


@STRATEGIES.register("si", params=SIParams,
                     summary="synaptic intelligence: importance from each parameter's path integral of the loss drop",
                     paper="Zenke, Poole & Ganguli 2017 (ICML)")
def _si(params: SIParams) -> Strategy:
    return SI(params)
