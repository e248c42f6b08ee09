"""Jobs of the flows: what a config asks a job to be, resolved into the engine's :class:`TrainSpec`.

The engine never sees the experiment config; this is the one place where a config's model, optimiser,
scheduler, method, data and device settings become objects (``spec_from_config``). A method that trains a weight
ensemble (a registry entry with ``pareto=True``: PaMaL, :mod:`polytask.models.pareto`) gets its model wrapped
in a :class:`~polytask.models.pareto.ParetoEnsemble`, its loss function set and its inner method built, and after
training its front is evaluated (``train_configured``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from polytask.config import Config, MethodConfig, TrainConfig
from polytask.engine.data import batch_source
from polytask.engine.hooks import Hook
from polytask.engine.loop import evaluate, load_matching, resolve_device, task_losses, train_job
from polytask.engine.optim import OptimizerFactory, SchedulerFactory, optimizer, scheduler
from polytask.engine.progress import Reporter
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import Method, build_method
from polytask.errors import ConfigError
from polytask.methods import load_all
from polytask.models import build_model
from polytask.models.pareto import PamalParams, ParetoEnsemble, front_grid, pamal_losses
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
    their registries, the job's method, the suite's splits on ``train.device``, checkpoints in ``job_dir``. A
    PaMaL job's model is the K-anchor ensemble of that model (K = its tasks) and its loss the multi-forward one."""
    tasks = [suite.task(n) for n in job.tasks]
    mc, tc = config.model, config.train
    pareto = pareto_params(job.method)

    def build() -> torch.nn.Module:
        model = build_model(tasks, suite.input_shape, mc.backbone, mc.backbone_params, mc.architecture,
                            mc.architecture_params, suite.categorical, mc.embedding_dim)
        if mc.init_from:
            load_matching(model, mc.init_from)
        return model

    def ensemble() -> torch.nn.Module:
        assert pareto is not None
        return ParetoEnsemble(build, len(tasks), pareto.init)

    return TrainSpec(
        name=job.id, tasks=tasks, model=build if pareto is None else ensemble,
        optimizer=optimizer_of(tc), scheduler=scheduler_of(tc),
        method=build_method(job.method, job.tasks) if pareto is None else inner_method(job.method, pareto, job.tasks),
        data=batch_source(suite.subset(job.tasks).splits, tc.batch_size),
        epochs=tc.epochs, checkpoint=CheckpointPolicy(Path(job_dir), tc.checkpoint_every, tc.checkpoint_interval_s),
        seed=config.seed + job.seed_offset, device=resolve_device(tc.device, tc.deterministic),
        hooks=tuple(hooks), eval_batch_size=tc.eval_batch_size, precision=tc.precision, accumulate=tc.accumulate,
        losses=None if pareto is None else pamal_losses(task_losses, pareto.samples, pareto.alpha_dirichlet,
                                                        pareto.reg_coefficient, pareto.temperature,
                                                        pareto.regulariser),
    )


def pareto_params(cfg: MethodConfig) -> PamalParams | None:
    """The validated parameters of a method that trains a weight ensemble (a registry entry with ``pareto=True``),
    None for any other method."""
    registry = load_all()
    if not registry.get(cfg.name).extra.get("pareto"):
        return None
    params = registry.params_for(cfg.name, cfg.params, f"methods.{cfg.label}.params")
    assert isinstance(params, PamalParams)
    return params


def inner_method(cfg: MethodConfig, params: PamalParams, task_names: Sequence[str]) -> Method:
    """The method a PaMaL job applies to its K multi-forward losses (``params.inner``), named as the job's method.
    The losses reach it only through the loss function, so its per-task gradients are taken in ``params`` mode
    (the ensemble has no shared features) and F-MTL, which would redraw the weightings, is refused."""
    if cfg.grad_mode != "params":
        raise ConfigError(f"methods.{cfg.label}.grad_mode: {cfg.name} differentiates its multi-forward losses, "
                          "which have no shared features; use grad_mode: params")
    if cfg.sam_rho:
        raise ConfigError(f"methods.{cfg.label}.sam_rho: F-MTL would recompute {cfg.name}'s losses at other "
                          "weightings; leave sam_rho at 0")
    inner = MethodConfig(name=params.inner, params=params.inner_params, label=cfg.label, chunk_size=cfg.chunk_size)
    return replace(build_method(inner, task_names), name=cfg.name)


def evaluate_front(spec: TrainSpec, grid: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """A trained PaMaL job's front: its best weights (``best.safetensors``) evaluated at every weighting of
    ``grid``, on the validation and test splits (per task: loss and metrics, as the result's ``val``/``test``).
    The model is rebuilt without touching the process's random state."""
    with torch.random.fork_rng(devices=[]):
        model = spec.model() if callable(spec.model) and not isinstance(spec.model, torch.nn.Module) else spec.model
    assert isinstance(model, ParetoEnsemble)
    model.load_state_dict(load_file(spec.checkpoint.best))
    device = torch.device(spec.device)
    model.to(device)
    data = spec.data.to(device)
    tasks = list(spec.tasks)
    front = []
    for alpha in grid:
        with model.at(alpha):
            front.append({"alpha": [float(a) for a in alpha],
                          "val": evaluate(model, data.split("val"), tasks, spec.eval_batch_size),
                          "test": evaluate(model, data.split("test"), tasks, spec.eval_batch_size)})
    return front


def train_configured(job: Job, suite: TaskSuite, config: Config, job_dir: Path, reporter: Reporter | None = None,
                     hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train ``job`` as ``config`` sets it up (resuming ``job_dir``'s checkpoint); the engine's result with the
    job's kind. A PaMaL job's result also holds ``front``: per weighting of :func:`~polytask.models.pareto.front_grid`
    (11 points for 2 tasks, 66 for 3), its ``alpha`` and ``val``/``test`` scores; its ``test`` (what the run
    compares) is at ``alpha``, the simplex's centre."""
    spec = spec_from_config(job, suite, config, job_dir, hooks)
    result = train_job(spec, reporter)
    out = {"job": result["job"], "kind": job.kind, **result}
    if pareto_params(job.method) is not None:
        k = len(job.tasks)
        out["alpha"] = [1.0 / k] * k
        out["front"] = evaluate_front(spec, front_grid(k, spec.seed))
    return out
