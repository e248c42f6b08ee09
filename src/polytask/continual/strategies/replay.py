"""Experience replay (ER): Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (Algorithm 1);
Rolnick et al. 2019, "Experience Replay for Continual Learning".

Each step trains on the current batch B_n concatenated with a batch B_M drawn from the buffer: one SGD step on the
mean loss of the concatenation, ``L = (n_cur L_cur + λ n_buf L_buf) / (n_cur + λ n_buf)`` (n: labels in each part;
the buffer is updated after the step, so B_M never holds the step's own rows), i.e. ``(1 − c) L_cur + c L_buf`` with
``c = λ n_buf / (n_cur + λ n_buf)``. The engine's step has already put the gradient of ``L_cur`` (the job's method's
objective) in ``.grad`` when the extra loss is asked for; replay scales those gradients by ``1 − c`` there and
returns ``c L_buf``, whose gradient the engine adds: the step's gradient is that of the concatenated batch (to float
rounding) without computing the current batch twice. With another method than ``equal`` it is the method's update
scaled by ``1 − c`` plus ``c ∇L_buf``. ``λ`` (``weight``) weighs a buffered row against a current one: 1 is the
paper, 0 is ``naive`` (no term at all, bit for bit). The buffer batch is forwarded with the random state that
follows the current batch's forward (forked, so the rest of training draws the same numbers): its dropout masks are
those a forward of the concatenation would draw. The current and the buffer batch are forwarded separately (mammoth's
``er`` and Avalanche forward the concatenation at once: a batch-norm model sees other batch statistics there).

Where the buffer is filled: ``update: experience`` by default (Avalanche's ReplayPlugin, with which the issue's
reference numbers were measured, adds an experience's rows once it is trained; its buffer is experience-balanced,
the ``reservoir`` default here gives experiences shares proportional to their sizes, ``class_balanced`` an equal
share per class); ``update: step`` is the paper's online reservoir rule (``polytask.continual.strategies.rehearsal``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from polytask.continual.strategies.rehearsal import Rehearsal, RehearsalParams, labels, same_draws, sample_loss
from polytask.continual.strategy import STRATEGIES, Strategy


class ReplayParams(RehearsalParams):
    """Parameters of ``replay``."""

    weight: float = Field(1.0, ge=0, description="λ: a buffered row's weight in the concatenated batch's mean loss "
                          "relative to a current row (1: the paper; 0: naive)")


class Replay(Rehearsal):
    """ER: each step's loss is the mean over the current batch and a buffer batch (module docstring)."""

    name = "replay"

    def __init__(self, params: ReplayParams) -> None:
        super().__init__(params)
        self.weight = params.weight

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        if not self.batches or self.weight == 0:
            return None
        with same_draws(run):
            replayed, n_buf = sample_loss(run.model, self.batches[0], self.tasks)
        n_cur = labels(step.batch.sources, step.batch.rows, [t.name for t in run.tasks])
        c = self.weight * n_buf / (n_cur + self.weight * n_buf)
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 - c)
        return c * replayed


@STRATEGIES.register("replay", params=ReplayParams,
                     summary="experience replay: each batch trained together with a batch of a fixed-size buffer "
                     "(reservoir or class-balanced)",
                     paper="Chaudhry et al. 2019, On Tiny Episodic Memories in Continual Learning; Rolnick et al. 2019")
def _replay(params: ReplayParams) -> Strategy:
    return Replay(params)
