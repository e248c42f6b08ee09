"""ER-ACE, experience replay with asymmetric cross-entropy: Caccia et al. 2022, "New Insights on Reducing Abrupt
Representation Change in Online Continual Learning" (ICLR; Eq. 5).

In the class scenario, the incoming batch's cross-entropy is taken over the logits of the classes present in that
batch only, and a buffer batch's over every class seen so far:

    L_ACE = ℓ(X_in; classes of the incoming batch) + ℓ(X_buf; classes seen so far)

so the incoming classes' gradients do not push down the logits of the classes the buffer holds (the abrupt change
of their representation when new classes arrive). The engine's step minimises the incoming batch's standard
cross-entropy (the method's loss); this strategy adds

    extra = [ℓ_masked(X_in) − ℓ(X_in)] + ℓ_seen(X_buf)

with both incoming terms from one recomputed forward of the same rows with the same dropout draws, so the step's
gradient is exactly that of L_ACE (to float rounding) when the job's method takes the plain loss (``equal``, the
default). Masked logits are set to the dtype's lowest value (they get no gradient).

Differences, documented: mammoth's ``er_ace`` applies the mask from the second experience on only, also keeps the
logits of the classes above the largest seen one, and takes the buffer's cross-entropy over every class; Avalanche's
``ER_ACE`` takes the buffer's over every class and halves the sum. Here both follow the paper. The buffer is filled
with each step's rows as they train (``update: step``, the paper's online reservoir rule; Avalanche's non-online
version adds an experience's rows before it trains). Class scenario only: with a head per task (task scenario) or
the same classes in every experience (domain scenario) there is no asymmetry to correct; use ``replay`` there.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from polytask.continual.strategies.rehearsal import Rehearsal, RehearsalParams, kept_buffers, same_draws
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.engine.step import masked_loss
from polytask.tasks.task import Task


class ERACEParams(RehearsalParams):
    """Parameters of ``er_ace``."""

    update: Literal["step", "experience"] = Field("step", description="when rows enter the buffer (step: the paper)")


def only(logits: Tensor, keep: Tensor) -> Tensor:
    """The logits with every class outside ``keep`` (a boolean vector over the classes) set to the lowest value."""
    return logits.masked_fill(~keep.to(logits.device), torch.finfo(logits.dtype).min)


class ERACE(Rehearsal):
    """ER-ACE (module docstring)."""

    name = "er_ace"
    scenarios = ("class",)
    step_rng = True  # the current batch is forwarded again with the draws of the step's own forward

    def __init__(self, params: ERACEParams) -> None:
        super().__init__(params)
        self.seen: Tensor | None = None  # classes trained so far (incoming batches and the buffer's), a boolean vector

    def on_step(self, run: Any, step: Any) -> None:
        super().on_step(run, step)
        (task,) = self.tasks.values()
        if self.seen is None:
            self.seen = torch.zeros(task.n_outputs, dtype=torch.bool)
        labelled = [src.y[task.name][rows] for src, rows in zip(step.batch.sources, step.batch.rows, strict=True)
                    if task.name in src.y] + ([self.buffer.y[task.name]] if task.name in self.buffer.y else [])
        for y in labelled:  # the incoming batch's classes and the buffer's
            self.seen[y[Task.mask(y)].long().cpu()] = True

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        (task,) = self.tasks.values()
        assert self.seen is not None
        terms = []
        with same_draws(run, self.rng):
            with kept_buffers(run.model):
                for src, rows in zip(step.batch.sources, step.batch.rows, strict=True):
                    if task.name not in src.y:
                        continue
                    out = run.model(src.x[rows], [task.name])[task.name]
                    y = src.y[task.name][rows]
                    present = torch.zeros(task.n_outputs, dtype=torch.bool)
                    present[y[Task.mask(y)].long().cpu()] = True
                    terms.append(masked_loss(task, only(out, present), y) - masked_loss(task, out, y))
            if self.batches:
                sample = self.batches[0]
                out = run.model(sample.data.x, [task.name])[task.name]
                terms.append(masked_loss(task, only(out, self.seen), sample.data.y[task.name]))
        return sum(terms[1:], terms[0]) if terms else None

    def extra_state(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


@STRATEGIES.register("er_ace", params=ERACEParams,
                     summary="replay with asymmetric cross-entropy: incoming rows over their own batch's classes, "
                     "buffered rows over all seen classes (class scenario)",
                     paper="Caccia et al. 2022, New Insights on Reducing Abrupt Representation Change in Online "
                     "Continual Learning (ICLR)")
def _er_ace(params: ERACEParams) -> Strategy:
    return ERACE(params)
