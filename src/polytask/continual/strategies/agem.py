"""Averaged Gradient Episodic Memory (A-GEM): Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM" (ICLR;
Eq. 11).

At every step, once the step's gradient g is set (the method's and every extra loss's), the reference gradient
g_ref of the loss on a buffer batch is computed; when they conflict (gᵀg_ref < 0), g is projected so that it no
longer increases the reference loss to first order:

    g̃ = g − (gᵀg_ref / g_refᵀg_ref) g_ref        (then g̃ᵀg_ref = 0)

over the flattened gradient of every trainable parameter (a head the buffer reaches but the step does not, e.g. an
earlier task's head in the task scenario, gets its share of the projection). The buffer is filled once an experience
is trained (``update: experience``, the paper's episodic memory), and the reference batch is ``batch_size`` buffered
rows (256 by default, the paper's P_ref; the whole buffer when it holds fewer). The reference forward pass runs with
the random state forked and the batch-norm statistics kept (a gradient probe, not a training pass).

Differences, documented: the paper gives each task its own share of the memory (an experience-balanced buffer);
here the buffer's policy decides (``reservoir`` or ``class_balanced``). Early versions of Avalanche's AGEMPlugin
projected each parameter tensor separately; here the projection is the paper's, over all parameters at once.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from polytask.continual.strategies.rehearsal import Rehearsal, RehearsalParams, kept_buffers, same_draws, sample_loss
from polytask.continual.strategy import STRATEGIES, Strategy


class AGEMParams(RehearsalParams):
    """Parameters of ``agem``."""

    batch_size: int | None = Field(256, ge=1, description="rows of the reference batch (the paper's P_ref)")


def agem_project(g: Tensor, ref: Tensor) -> Tensor:
    """A-GEM's projection (Eq. 11): ``g`` unchanged when ``gᵀref ≥ 0``, else ``g − (gᵀref / refᵀref) ref`` (computed
    in float64, returned in ``g``'s dtype). A zero ``ref`` leaves ``g`` unchanged."""
    dot = torch.dot(g.double(), ref.double())
    if dot >= 0:
        return g
    return (g.double() - dot / torch.dot(ref.double(), ref.double()) * ref.double()).to(g.dtype)


class AGEM(Rehearsal):
    """A-GEM (module docstring)."""

    name = "agem"

    def __init__(self, params: AGEMParams) -> None:
        super().__init__(params)
        self.projected = 0  # steps whose gradient was projected (for tests and curiosity)

    def before_update(self, run: Any, step: Any) -> None:
        if not self.batches:
            return
        params = [p for p in run.model.parameters() if p.requires_grad]
        with same_draws(run), kept_buffers(run.model):
            loss, _ = sample_loss(run.model, self.batches[0], self.tasks)
            ref = torch.autograd.grad(loss, params, allow_unused=True)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        r = torch.cat([(q if q is not None else torch.zeros_like(p)).reshape(-1) for p, q in zip(params, ref,
                                                                                              strict=True)])
        new = agem_project(g, r)
        if new is g:
            return
        self.projected += 1
        start = 0
        for p, q in zip(params, ref, strict=True):
            part = new[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
            if p.grad is None and q is None:
                continue
            p.grad = part.detach().clone()

    def extra_state(self) -> dict[str, Any]:
        return {"projected": self.projected}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.projected = int(state["projected"])


@STRATEGIES.register("agem", params=AGEMParams,
                     summary="A-GEM: project each step's gradient so the loss of a buffer batch does not rise (to "
                     "first order)",
                     paper="Chaudhry et al. 2019, Efficient Lifelong Learning with A-GEM (ICLR)")
def _agem(params: AGEMParams) -> Strategy:
    return AGEM(params)
