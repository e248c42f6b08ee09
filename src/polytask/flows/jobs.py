"""Jobs of the flows: what a config asks a job to be, resolved into the engine's :class:`TrainSpec`.

The engine never sees the experiment config; this is the one place where a config's model, optimiser,
scheduler, method, data and device settings become objects (``spec_from_config``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polytask.config import Config, MethodConfig, TrainConfig
from polytask.engine.data import batch_source
from polytask.engine.hooks import Hook
from polytask.engine.loop import load_matching, resolve_device, train_job
from polytask.engine.optim import OptimizerFactory, SchedulerFactory, optimizer, scheduler
from polytask.engine.progress import Reporter
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import build_method
from polytask.models import build_model
from polytask.tasks.task import TaskSuite


@dataclass(frozen=True)
class Job:
    """One model to train: an id (``stl/<task>`` or a method label), its tasks and its method."""

    id: str
    tasks: tuple[str, ...]
    method: MethodConfig
    kind: str  # "single_task" or "joint"

    @property
    def seed_offset(self) -> int:
        return zlib.crc32(self.id.encode())


def optimizer_of(tc: TrainConfig) -> OptimizerFactory:
    """The optimiser factory that ``train.optimizer`` names (keys of other optimisers, e.g. sgd's momentum under
    adam, are ignored)."""
    o = tc.optimizer
    return optimizer(o.name, o.model_dump(exclude={"name"}), "train.optimizer", ignore_unknown=True)


def scheduler_of(tc: TrainConfig) -> SchedulerFactory | None:
    """The scheduler factory that ``train.scheduler`` names (None: no scheduler)."""
    s = tc.scheduler
    return scheduler(s.name, s.model_dump(exclude={"name"}), "train.scheduler", ignore_unknown=True)


def spec_from_config(job: Job, suite: TaskSuite, config: Config, job_dir: Path,
                     hooks: Sequence[Hook] = ()) -> TrainSpec:
    """The engine's spec of ``job`` on ``suite`` as ``config`` sets it up: the configured model (built after the
    job's seed ``config.seed + job.seed_offset`` is set; ``model.init_from`` loaded), optimiser and scheduler from
    their registries, the job's method, the suite's splits on ``train.device``, checkpoints in ``job_dir``."""
    tasks = [suite.task(n) for n in job.tasks]
    mc, tc = config.model, config.train

    def build() -> torch.nn.Module:
        model = build_model(tasks, suite.input_shape, mc.backbone, mc.backbone_params, mc.architecture,
                            mc.architecture_params, suite.categorical, mc.embedding_dim)
        if mc.init_from:
            load_matching(model, mc.init_from)
        return model

    return TrainSpec(
        name=job.id, tasks=tasks, model=build,
        optimizer=optimizer_of(tc), scheduler=scheduler_of(tc),
        method=build_method(job.method, job.tasks),
        data=batch_source(suite.subset(job.tasks).splits, tc.batch_size),
        epochs=tc.epochs, checkpoint=CheckpointPolicy(Path(job_dir), tc.checkpoint_every),
        seed=config.seed + job.seed_offset, device=resolve_device(tc.device, tc.deterministic),
        hooks=tuple(hooks), eval_batch_size=tc.eval_batch_size, precision=tc.precision, accumulate=tc.accumulate,
    )


def train_configured(job: Job, suite: TaskSuite, config: Config, job_dir: Path, reporter: Reporter | None = None,
                     hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train ``job`` as ``config`` sets it up (resuming ``job_dir``'s checkpoint); the engine's result with the
    job's kind."""
    result = train_job(spec_from_config(job, suite, config, job_dir, hooks), reporter)
    return {"job": result["job"], "kind": job.kind, **result}
