"""The shared core of the rehearsal strategies (replay, DER, ER-ACE, A-GEM): one :class:`~.buffer.Buffer`, when it
is filled, the buffer batches of each step, and the losses of buffered rows.

When the buffer is filled (``update``):

- ``experience`` (the default of replay and A-GEM, as Avalanche's ReplayPlugin and the A-GEM paper): once an
  experience is trained, its training rows are offered to the buffer in a random order drawn from (seed,
  experience); while an experience trains, the buffer holds rows of earlier experiences only.
- ``step`` (the online rule of ER, DER and ER-ACE): each step's rows are offered as the step trains, after its buffer
  batches are drawn (so a step never replays its own rows), during the first epoch of the experience only: every
  training row is offered once, the buffer is a sample of the stream's rows and never holds a row twice. The papers
  train one epoch; mammoth, training several, offers every epoch's rows again (the same row may then be held twice,
  with the outputs of different epochs for DER).

Every step draws its buffer batches (``batch_size`` rows each, default the training batch size) without replacement,
from (seed, experience, step), before the step's rows enter the buffer. A buffered row is replayed through the head
of every task it is labelled for: in the task scenario its own experience's head (the task label is stored with the
row), in the class and domain scenarios the shared head. A buffered row's loss (:func:`sample_loss`) is the mean over
its labels, as the engine's task loss is.

Extra forward passes a strategy makes (the buffer batches, the current batch again) run with the global random state
forked (:func:`same_draws`): they do not change the random numbers of the rest of training, and a recomputation of
the current batch draws the same dropout masks as the step's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.continual.strategies.buffer import Buffer, OutputFn, Sample
from polytask.continual.strategy import Strategy
from polytask.continual.stream import Stream
from polytask.engine.data import permutation
from polytask.engine.loop import task_losses
from polytask.engine.step import _rng, _set_rng
from polytask.models.mode import evaluating
from polytask.tasks.task import Task, TaskData, TaskSuite


class RehearsalParams(BaseModel):
    """The buffer of a rehearsal strategy and how it is filled and read."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(200, ge=0, description="rows the buffer holds (0: none; a buffer larger than the data holds "
                      "every row)")
    policy: Literal["reservoir", "class_balanced"] = Field("reservoir", description="reservoir: a uniform sample of "
                                                           "the rows seen; class_balanced: an equal share per class")
    update: Literal["step", "experience"] = Field("experience", description="when rows enter the buffer: as each "
                                                  "step trains (first epoch), or once an experience is trained")
    batch_size: int | None = Field(None, ge=1, description="rows per buffer batch (default: the training batch size)")


@contextmanager
def same_draws(run: Any, rng: tuple[Tensor, Tensor | None] | None = None) -> Iterator[None]:
    """Run extra forward passes with the global random state forked (restored on exit), from ``rng`` when given
    (the state the step started from, so the step's own forward is reproduced with the same dropout masks)."""
    device = torch.device(run.device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if rng is not None:
            _set_rng(rng, device)
        yield


@contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers (batch-norm running statistics) on exit: a forward pass that repeats one the step
    already made must not move them twice."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def labels(sources: list[TaskData] | tuple[TaskData, ...], rows: Any, names: list[str]) -> int:
    """Labels (labelled (row, task) pairs) of ``names`` in the rows of the sources."""
    return sum(int(Task.mask(src.y[n][r]).sum()) for src, r in zip(sources, rows, strict=True)
               for n in names if n in src.y)


def sample_loss(model: nn.Module, sample: Sample, tasks: dict[str, Task]) -> tuple[Tensor, int]:
    """The mean loss over the labels of buffered rows (each row through the head of every task it is labelled for)
    and the number of labels."""
    y = sample.data.y
    names = [n for n in tasks if n in y and bool(Task.mask(y[n]).any())]
    counts = torch.tensor([float(Task.mask(y[n]).sum()) for n in names])
    rows = torch.arange(len(sample.data), device=sample.data.x.device)
    losses = task_losses(model, [sample.data], [rows], [tasks[n] for n in names])
    return (losses * (counts / counts.sum()).to(losses)).sum(), int(counts.sum())


def model_outputs(model: nn.Module, device: torch.device, chunk: int = 1024) -> OutputFn:
    """The model's outputs of given rows and tasks, in eval mode without gradients, on the rows' device (the outputs
    DER stores: eval mode, so no dropout draws and no batch-norm statistics move)."""

    @torch.no_grad()
    def outputs(x: Tensor, names: list[str] | tuple[str, ...]) -> dict[str, Tensor]:
        with evaluating(model):
            parts = [model(x[i:i + chunk].to(device), list(names)) for i in range(0, len(x), chunk)]
        return {n: torch.cat([p[n] for p in parts]).to(x.device) for n in names}

    return outputs


class Rehearsal(Strategy):
    """Base of the rehearsal strategies: keeps the buffer (filled per ``update``), draws ``draws`` buffer batches at
    every step into ``self.batches`` (empty while the buffer is), and stores the model's outputs with each row when
    ``stores_outputs`` (DER). Subclasses turn the batches into a loss (``extra_loss``) or a gradient change
    (``before_update``)."""

    draws = 1
    stores_outputs = False
    step_rng = False  # keep the random state each step starts from (``self.rng``: a strategy that recomputes the step)

    def __init__(self, params: RehearsalParams) -> None:
        super().__init__()
        self.params = params
        self.buffer = Buffer(params.size, params.policy)
        self.batches: list[Sample] = []
        self.rng: tuple[Tensor, Tensor | None] | None = None

    @property
    def tasks(self) -> dict[str, Task]:
        """The stream's tasks by name (a buffered row may belong to a task of an earlier experience)."""
        assert self.stream is not None
        return {t.name: t for t in self.stream.tasks}

    def on_step(self, run: Any, step: Any) -> None:
        self.rng = _rng(torch.device(run.device)) if self.step_rng else None
        n = self.params.batch_size or getattr(run.data, "batch_size", None) or sum(len(r) for r in step.batch.rows)
        self.draw_batches(run, step, n)
        if self.params.update == "step" and step.epoch == 0:
            assert self.stream is not None
            outputs = model_outputs(run.model, run.device) if self.stores_outputs else None
            for src, rows in zip(step.batch.sources, step.batch.rows, strict=True):
                self.buffer.offer(src.take(rows), self.index, self.stream.tasks, self.seed, outputs)

    def draw_batches(self, run: Any, step: Any, n: int) -> None:
        """The step's buffer batches of ``n`` rows each into ``self.batches`` (fewer when the buffer is empty)."""
        self.batches = []
        for k in range(self.draws):
            s = self.draw(n, step.global_step, k)
            if s is None:
                break
            self.batches.append(s.to(run.device))

    def draw(self, n: int, global_step: int, k: int) -> Sample | None:
        """Buffer batch ``k`` of a step (the rows of :meth:`draw_rows`); None while there is nothing to draw."""
        slots = self.draw_rows(n, global_step, k)
        return None if slots is None else self.buffer.take(slots)

    def draw_rows(self, n: int, global_step: int, k: int) -> Tensor | None:
        """The buffer slots of batch ``k`` of a step: ``n`` rows without replacement, a pure function of (seed,
        experience, step, k); None while the buffer is empty. A strategy that replays from part of the buffer
        overrides it."""
        return self.buffer.slots(n, global_step, self.seed, self.index, k)

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        self.batches = []
        if self.params.update == "experience":
            self.fill(stream.experiences[index].suite, stream, index, model, device)

    def fill(self, suite: TaskSuite, stream: Stream, index: int, model: nn.Module, device: torch.device) -> None:
        """Offer every training row of ``suite`` (experience ``index``) in a random order drawn from (seed, index)."""
        outputs = model_outputs(model, device) if self.stores_outputs else None
        for s, src in enumerate(suite.splits["train"]):
            self.buffer.offer(src.take(permutation(len(src), self.seed, index, s)), index, stream.tasks, self.seed,
                              outputs)

    def extra_state(self) -> dict[str, Any]:
        """What a subclass keeps besides the buffer."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def state_dict(self) -> Any:
        return {"buffer": self.buffer.state_dict(), **self.extra_state()}

    def load_state_dict(self, state: Any) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.load_extra_state(state)
