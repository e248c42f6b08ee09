"""Learning without Forgetting (Li & Hoiem 2017, "Learning without forgetting", TPAMI; Eq. 2 and Algorithm 1).

After each experience a copy of the model is kept. While a later experience trains, every step adds
``α Σ_t KD_T(old_t(x), new_t(x))`` on the step's inputs x, over every task t that an earlier experience trained:
``KD_T = KL(softmax(o/T) || softmax(n/T))`` over the classes of t seen in earlier experiences (mean over the rows),
o the old model's logits and n the current one's. That covers every scenario: in the task scenario the heads of the
previous tasks (all their classes), in the class scenario the one head's logits of the previously seen classes,
softmax over those classes only, in the domain scenario the shared head (all its classes), in a multitask stream the
previous tasks' heads. A regression task of an earlier experience is distilled by its own loss with the old outputs
as targets (the squared error). A task with a single old class carries no distillation signal.

Differences, documented: the paper first warms up the new task's head alone (shared and old parameters frozen),
then trains everything; here, as in Avalanche, every parameter trains from the first step. The paper records the old
network's outputs on the new task's data once, before training (the same as keeping the old model when the inputs
are fixed, as here, without augmentation); its L_old is the cross-entropy −Σ y'_o log ŷ'_o, which differs from this
KL by the entropy of the old outputs, a constant (the same gradient); like the paper and Avalanche, no T² factor
(Hinton et al. 2015). The paper's λ_o is α here (1 by default, T = 2). Avalanche's LwFPlugin (class scenario) takes
the softmax over all the units and then keeps the old classes' entries, so its targets do not sum to one; here the
softmax is over the old classes only. The old model runs in eval mode (no dropout), the current one in train mode
(it is the model being trained), on one more forward pass of the step's inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call

from polytask.continual.strategies.regularization import to_device
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream, labelled_classes
from polytask.models.mode import evaluating
from polytask.tasks.task import Task


def distillation(new: Tensor, old: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(old/T) || softmax(new/T))``, averaged over the rows (Hinton et al. 2015's soft targets)."""
    return F.kl_div(F.log_softmax(new / temperature, -1), F.log_softmax(old / temperature, -1), reduction="batchmean",
                    log_target=True)


def old_outputs(stream: Stream, index: int) -> dict[str, list[int] | None]:
    """Per task trained by experiences before ``index``: the classes they trained (classification), or None (a
    regression task: all its outputs)."""
    out: dict[str, set[int] | None] = {}
    for e in stream.experiences[:index]:
        for t in e.tasks:
            if t.kind == "classification":
                seen = out.get(t.name) or set()
                out[t.name] = seen | labelled_classes(e, "train", t)
            else:
                out[t.name] = None
    return {n: None if c is None else sorted(c) for n, c in out.items()}


class LwFParams(BaseModel):
    """Parameters of ``lwf``."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, ge=0, description="weight of the distillation loss (the paper's λ_o)")
    temperature: float = Field(2.0, gt=0, description="T of the softened softmax (the paper: 2)")


class LwF(Strategy):
    """Learning without Forgetting: distil the previous model's outputs for the old tasks on the new inputs."""

    name = "lwf"

    def __init__(self, params: LwFParams) -> None:
        super().__init__()
        self.params = params
        self.old: dict[str, Tensor] | None = None
        self.targets: dict[str, list[int] | None] = {}
        self.tasks: dict[str, Task] = {}

    def begin(self, stream: Stream, index: int) -> None:
        super().begin(stream, index)
        self.targets = old_outputs(stream, index)
        self.tasks = {t.name: t for t in stream.tasks}

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        if self.old is None or not self.targets:
            return None
        model: nn.Module = run.model
        self.old = to_device(self.old, run.device)
        names = list(self.targets)
        x = torch.cat([src.x[r] for src, r in zip(step.batch.sources, step.batch.rows, strict=True)])
        with evaluating(model), torch.no_grad():
            before = functional_call(model, self.old, (x, names))
        now = model(x, names)
        total = None
        for n, classes in self.targets.items():
            if not now[n].requires_grad:  # a frozen head and features (incremental rank updates): nothing to keep
                continue
            if classes is None:
                term = self.tasks[n].loss(now[n], before[n]).mean()
            elif len(classes) < 2:
                continue
            else:
                term = distillation(now[n][:, classes], before[n][:, classes], self.params.temperature)
            total = term if total is None else total + term
        return None if total is None else self.params.alpha * total

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        self.old = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> Any:
        return {"old": self.old}

    def load_state_dict(self, state: Any) -> None:
        self.old = state["old"]


@STRATEGIES.register("lwf", params=LwFParams,
                     summary="learning without forgetting: distil the previous model's old-task outputs",
                     paper="Li & Hoiem 2017 (TPAMI)")
def _lwf(params: LwFParams) -> Strategy:
    return LwF(params)
