"""Experience replay (ER): Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (Algorithm 1);
Rolnick et al. 2019, "Experience Replay for Continual Learning".

Each step trains on the current batch B_n concatenated with a batch B_M drawn from the buffer: one SGD step on the
mean loss of the concatenation, ``L = (n_cur L_cur + λ n_buf L_buf) / (n_cur + λ n_buf)`` (n: labels in each part;
the buffer is updated after the step, so B_M never holds the step's own rows). ``λ`` (``weight``) weighs a buffered
row against a current one: 1 is the paper, 0 is ``naive`` (no term at all, bit for bit). Two ways, one gradient:

- Joined (one task in the job, λ = 1, buffered rows labelled for that task only: the class and domain scenarios):
  the buffered rows join the step's batch (``train_batch``), one forward and backward of the concatenation, as the
  paper, mammoth's ``er`` and Avalanche do; the job's method weighs the concatenated batch's loss, and a batch-norm
  model normalises the concatenation. While the buffer holds still (``update: experience``, or after the first
  epoch), the experience's training rows and the buffer's are joined once (up to ``POOL_BYTES`` of training rows:
  the join copies them) and a step's batch is a set of rows of that pool: the same rows, indexed once.
- Otherwise (the task scenario, λ ≠ 1): ``L = (1 − c) L_cur + c L_buf`` with ``c = λ n_buf / (n_cur + λ n_buf)``.
  The engine's step has put the gradient of ``L_cur`` (the method's objective) in ``.grad`` when the extra loss is
  asked for; replay scales those gradients by ``1 − c`` there and returns ``c L_buf``, whose gradient the engine
  adds: the concatenated batch's gradient (to float rounding; with another method than ``equal``, the method's
  update scaled by ``1 − c`` plus ``c ∇L_buf``) without computing the current batch twice. The buffer batch is
  forwarded on its own (its batch-norm statistics its own) with the random state that follows the current batch's
  forward, forked: its dropout masks are those a forward of the concatenation would draw, and the rest of training
  draws the same numbers.

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
from polytask.engine.data import Batch
from polytask.tasks.task import Task, TaskData

POOL_BYTES = 1 << 28  # a source up to 256 MiB is joined to the buffer once per experience (``Replay._pool``)
Pool = tuple[TaskData, int, torch.device | None]  # the joined rows, the first buffer row, the slots' device


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
        self.joined = False  # this step trains on the concatenation (train_batch), so no extra term
        self.slots: Tensor | None = None  # the buffer slots it joins to its batch
        self._joined_pool: tuple[TaskData, tuple[int, str], Pool | None] | None = None  # (source, key, pool)

    def draw_batches(self, run: Any, step: Any, n: int) -> None:
        """A step that joins its buffer rows to its batch draws only their slots (the rows of ``draw``'s batch 0)."""
        self.joined, self.slots = False, None
        name = run.tasks[0].name if len(run.tasks) == 1 else None
        if self.weight != 1 or name is None or len(step.batch.sources) != 1 or name not in step.batch.sources[0].y \
                or self.buffer.y.keys() != {name}:
            super().draw_batches(run, step, n)
            return
        self.batches = []
        self.slots = self.draw_rows(n, step.global_step, 0)
        self.joined = self.slots is not None

    def train_batch(self, run: Any, step: Any) -> Batch | None:
        slots = self.slots
        if slots is None:
            return None
        task, buffer = run.tasks[0], self.buffer
        src, rows = step.batch.sources[0], step.batch.rows[0]
        assert buffer.x is not None
        if not (self.params.update == "step" and step.epoch == 0):  # the buffer holds still while this trains
            pool = self._pool(task, src)
            if pool is not None:  # the buffer's rows follow the source's in the pool
                data, offset, device = pool
                return Batch([data], [torch.cat([rows, (slots if device is None else slots.to(device)) + offset])])
        device = src.x.device
        at = slots.to(buffer.x.device)
        joined = TaskData(torch.cat([src.x[rows], buffer.x[at].to(device)]),
                          {task.name: torch.cat([src.y[task.name][rows], buffer.y[task.name][at].to(device)])})
        return Batch([joined], [torch.arange(len(joined), device=device)])

    def _pool(self, task: Task, src: TaskData) -> Pool | None:
        """The experience's training rows then the buffer's, every one labelled for ``task``, joined once per source
        and buffer state (a step's joined batch is then one set of rows of it, indexed once by the engine, its labels
        cast once), with the first buffer row's index and the device the slots go to (None: the CPU, where they
        are); None when a row lacks a label, the two lie on different devices, or the source is larger than
        ``POOL_BYTES`` (the pool copies it: a step then joins its rows alone)."""
        buffer = self.buffer
        key = (buffer.version, task.name)
        if self._joined_pool is not None and self._joined_pool[0] is src and self._joined_pool[1] == key:
            return self._joined_pool[2]
        assert buffer.x is not None
        y = buffer.y[task.name]
        pool = None
        if src.x.device == buffer.x.device and src.x.numel() * src.x.element_size() <= POOL_BYTES \
                and src.complete(task.name) and bool(Task.mask(y).all()):
            pool = (TaskData.labelled(torch.cat([src.x, buffer.x]), {task.name: torch.cat([src.y[task.name], y])},
                                      {task.name: torch.cat([src.labels(task), task.labels(y)])}),
                    len(src), None if src.x.device.type == "cpu" else src.x.device)
        self._joined_pool = (src, key, pool)
        return pool

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        if not self.batches or self.weight == 0 or self.joined:
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
