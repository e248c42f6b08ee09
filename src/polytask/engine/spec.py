"""What the engine trains: a typed spec of resolved objects, never an experiment config or a name to look up.

The flows resolve a config into a :class:`TrainSpec` (``polytask.flows.jobs.spec_from_config``); a Python user
builds one directly: any model that returns one output per task, an optimiser factory (``engine.optim`` or
any callable), a built method (``engine.step.build_method``), a batch source, hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polytask.engine.data import BatchSource
from polytask.engine.hooks import Hook
from polytask.engine.optim import OptimizerFactory, SchedulerFactory
from polytask.engine.step import PRECISIONS, LossFn, Method
from polytask.errors import ConfigError
from polytask.tasks.task import Task

CHECKPOINT = "last.safetensors"
BEST = "best.safetensors"
TIMING = "timing.json"  # wall time so far; kept out of the checkpoint so that identical runs write identical bytes


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where a job keeps its state (``dir``: ``last.safetensors``, ``best.safetensors``, ``timing.json``) and how
    often: after every epoch, and also every ``every`` steps (0: epochs only), but not within ``interval`` seconds of
    the previous checkpoint or of the job's start (or resumption); the last epoch's is always written when the job
    is final (``TrainSpec.final``: a caller that goes on, the continual flow, saves the job's end state itself). A
    resume is exact from any checkpoint, and from none (the job starts again); ``interval`` bounds what checkpoints
    cost when epochs are short (a kill then loses at most ``interval`` seconds and one epoch of training; a job
    shorter than ``interval`` writes only its last checkpoint, or none; 0: every epoch, as often as asked)."""

    dir: Path
    every: int = 0
    interval: float = 0.0

    @property
    def last(self) -> Path:
        """The checkpoint written after every epoch (and every ``every`` steps): what a resume starts from."""
        return Path(self.dir) / CHECKPOINT

    @property
    def best(self) -> Path:
        """The model weights of the epoch with the best validation score (what ``polytask.load`` serves)."""
        return Path(self.dir) / BEST

    @property
    def timing(self) -> Path:
        """The job's wall-clock times, kept beside the checkpoint so identical runs write identical checkpoints."""
        return Path(self.dir) / TIMING


@dataclass(frozen=True)
class TrainSpec:
    """One job for the engine.

    ``model`` is a module, or a function that builds one: it is called after the job's seed is set, so the
    initial weights are a function of ``seed``. ``optimizer`` is called with the parameters once the model is
    on ``device``; ``scheduler`` (optional) with the optimiser and ``epochs``, and stepped after each epoch.

    ``precision``: ``fp32``, or ``bf16`` to run the forward pass and losses under autocast (per-task gradients,
    the float64 Gramian, the method and the optimiser stay in full precision; ``polytask.engine.step``).
    ``accumulate``: micro-batches per optimiser step: each step takes that many consecutive batches of ``data``
    (the effective batch is ``accumulate`` times the source's batch; the last step of an epoch may take fewer), and
    the method sees the whole effective batch (``engine.step.accumulated_step``). Checkpoints are written at
    optimiser-step boundaries only: a job stopped between micro-batches redoes that step from its first one.

    ``select``: which weights the job ends with (and writes to ``best.safetensors``): ``best``, those of the epoch
    with the best validation score, or ``last``, those after the last epoch (continual learning hands the last
    weights of one experience to the next; no copy of the best weights is kept). ``final``: at the end, write
    ``best.safetensors`` and score the test split (the result's ``test``); False skips both, for a flow that keeps
    the weights and scores them itself (continual learning's ``end.safetensors`` and accuracy matrix).

    ``losses``: the K per-task losses of a training step (and of the validation batches of methods that watch
    validation), ``(model, sources, rows, tasks) -> K-vector``; None: ``engine.loop.task_losses``. PaMaL's
    multi-forward loss is one (``polytask.models.pareto.pamal_losses``); evaluation always uses the plain losses.
    """

    name: str
    tasks: Sequence[Task]
    model: torch.nn.Module | Callable[[], torch.nn.Module]
    optimizer: OptimizerFactory
    method: Method
    data: BatchSource
    epochs: int
    checkpoint: CheckpointPolicy
    seed: int = 0
    device: torch.device | str = "cpu"
    scheduler: SchedulerFactory | None = None
    hooks: Sequence[Hook] = field(default_factory=tuple)
    eval_batch_size: int = 1024
    precision: str = "fp32"
    accumulate: int = 1
    select: str = "best"
    final: bool = True
    losses: LossFn | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: {self.precision!r} is not one of {list(PRECISIONS)} "
                              f"(job {self.name!r})")
        if self.accumulate < 1:
            raise ConfigError(f"train.accumulate: {self.accumulate} micro-batches per step; must be at least 1 "
                              f"(job {self.name!r})")
        if self.select not in ("best", "last"):
            raise ConfigError(f"job {self.name!r}: select must be 'best' or 'last', got {self.select!r}")
        if self.accumulate > 1 and self.method.sam_rho:
            raise ConfigError(f"train.accumulate: job {self.name!r} uses F-MTL (sam_rho), which recomputes the whole "
                              "batch's losses at perturbed parameters and cannot accumulate; use train.accumulate: 1")
