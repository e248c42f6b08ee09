"""Hooks: the one extension point of the training loop.

A hook rides on a job: ``init`` when the job starts or resumes, ``on_step`` before each optimiser step (it sees
the step's batch), ``train_batch`` to train the step on other rows, ``extra_loss`` for a term added to what the step
minimises, ``before_update`` with the step's gradients set (it may change them), ``on_epoch`` after each epoch's
validation. Its ``state_dict`` is checkpointed
under its ``name`` with the job and handed back to ``load_state_dict`` on resume, so a stateful hook resumes exactly;
its wall-clock times (``timing``) go into ``timing.json`` beside the checkpoint, never into the checkpoint
(identical runs write identical bytes). Relation probes, loggers and continual-learning strategies are hooks; the
engine imports none of them.

Every method is optional (the base class does nothing), as in a Lightning ``Callback``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from polytask.engine.data import Batch, BatchSource
from polytask.errors import ConfigError
from polytask.tasks.task import Task

if TYPE_CHECKING:
    from polytask.engine.state import LoopState


@dataclass
class Run:
    """What a hook sees of the job it rides on: the live model and optimiser, the tasks, the data, the job's seed
    and device, and the loop state (position, history, best epoch)."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tasks: Sequence[Task]
    data: BatchSource
    seed: int
    device: torch.device
    state: LoopState


@dataclass(frozen=True)
class StepView:
    """One step as a hook sees it: 0-based epoch, step within the epoch and global step, and the batch."""

    epoch: int
    step: int
    global_step: int
    batch: Batch


class Hook:
    """Base class of hooks; override what you need. ``name`` keys the hook's state in the checkpoint."""

    name: str = "hook"

    def init(self, run: Run) -> None:
        """Called when the job starts or resumes, before the hook's saved state (if any) is loaded."""

    def on_step(self, run: Run, step: StepView) -> None:
        """Called before each optimiser step, on the step's batch (the model is in train mode)."""

    def train_batch(self, run: Run, step: StepView) -> Batch | None:
        """The rows the step trains on instead of its batch (replay joins buffered rows to it, for one forward and
        backward of the concatenation), or None to keep it; asked after ``on_step``. The step then trains on the
        returned batch as one micro-batch. Hooks still see the step's own batch in ``step``."""
        return None

    def extra_loss(self, run: Run, step: StepView) -> Tensor | None:
        """A scalar added to what the step minimises (its gradient is added to every parameter it reaches, after
        the method has set the task gradients); None adds nothing."""
        return None

    def before_update(self, run: Run, step: StepView) -> None:
        """Called with every gradient of the step in ``.grad`` (the method's and the extra losses'), just before the
        optimiser step: a hook may change the gradients here (A-GEM projects them)."""

    def on_epoch(self, run: Run, epoch: int) -> None:
        """Called after epoch ``epoch`` (1-based) is trained and validated, before its checkpoint is written."""

    def state_dict(self) -> Any:
        """The hook's state to checkpoint (a tree of dicts, lists, numbers, strings and tensors); None: nothing."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore what ``state_dict`` returned."""

    def timing(self) -> dict[str, Any] | None:
        """Wall-clock measurements (JSON) to keep beside the checkpoint, not in it; None: nothing."""
        return None

    def load_timing(self, timing: dict[str, Any]) -> None:
        """Restore what ``timing`` returned (a resumed job keeps the time measured before it stopped)."""


def check_hooks(hooks: Sequence[Hook]) -> None:
    """Hook names key their checkpointed state: each must be a non-empty string used once."""
    names = [h.name for h in hooks]
    for n in names:
        if not isinstance(n, str) or not n:
            raise ConfigError(f"hook {n!r}: a hook needs a non-empty string name (it keys its checkpointed state)")
        if names.count(n) > 1:
            raise ConfigError(f"hooks: two hooks are named {n!r}; give each its own name (it keys its state)")


def overriding(hooks: Sequence[Hook], method: str) -> list[Hook]:
    """The hooks that define ``method`` themselves: the base class's does nothing, so the loop calls only these."""
    base = getattr(Hook, method)
    return [h for h in hooks if getattr(getattr(h, method), "__func__", None) is not base]


def train_batch(hooks: Sequence[Hook], run: Run, step: StepView) -> Batch | None:
    """The batch the step trains on when a hook replaces it (the last hook that does wins), else None."""
    out = None
    for h in hooks:
        b = h.train_batch(run, step)
        if b is not None:
            out = b
    return out


def extra_loss(hooks: Sequence[Hook], run: Run, step: StepView) -> Tensor | None:
    """The sum of the hooks' extra loss terms for this step (None when no hook adds one)."""
    total = None
    for h in hooks:
        term = h.extra_loss(run, step)
        if term is not None:
            total = term if total is None else total + term
    return total


def before_update(hooks: Sequence[Hook], run: Run, step: StepView) -> None:
    """Every hook's ``before_update``, in order."""
    for h in hooks:
        h.before_update(run, step)
