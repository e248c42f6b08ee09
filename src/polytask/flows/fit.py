"""``polytask.fit``: train the user's own ``nn.Module`` on torch ``Dataset``s/``DataLoader``s with any method.

It runs on the engine's seam (:func:`polytask.engine.loop.train_job` with a
:class:`~polytask.engine.data.DatasetBatches` source) and writes a run directory like the CLI's: the job's
checkpoints under ``jobs/<name>/`` (calling ``fit`` again on the same ``run_dir`` resumes exactly), ``metrics.jsonl``,
``summary.json`` and ``report.html``. Under torchrun it trains data-parallel (:mod:`polytask.engine.distributed`):
every rank calls ``fit`` with the same arguments, rank 0 names, locks and writes the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from polytask.config import MethodConfig
from polytask.engine import distributed
from polytask.engine.data import DatasetBatches
from polytask.engine.loop import resolve_device, train_job
from polytask.engine.optim import optimizer as registered_optimizer
from polytask.engine.progress import Reporter
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import build_method
from polytask.errors import ConfigError, DataError
from polytask.flows.runner import header, lock_run, releases_run_locks
from polytask.io import atomic_write_json, atomic_write_text
from polytask.models.user import EncodedUserModel, UserModel
from polytask.tasks.task import Task

TaskLike = Task | Mapping[str, Any] | Sequence[Any]


def as_task(spec: TaskLike) -> Task:
    """A polytask ``Task`` from a Task, a dict ``{name, kind, n_outputs}`` or a tuple ``(name, kind, n_outputs)``."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, Mapping):
        return Task(**spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 3:
        return Task(str(spec[0]), spec[1], int(spec[2]))
    raise DataError(f"tasks: {spec!r} is not a Task, a dict (name, kind, n_outputs) or a tuple of those three")


@dataclass
class FitResult:
    """What ``fit`` returns: the trained user module (best-validation weights), the run directory, the job's
    result (best epoch, validation and test scores, history) and the run's summary."""

    model: nn.Module
    run_dir: Path
    result: dict[str, Any]
    summary: dict[str, Any]


@releases_run_locks
def fit(model: nn.Module, tasks: Iterable[TaskLike], train: Any, val: Any, test: Any | None = None, *,
        method: str | MethodConfig = "equal", method_params: Mapping[str, Any] | None = None,
        mode: str = "params", epochs: int = 10, batch_size: int | None = None, steps_per_epoch: int | None = None,
        optimizer: str = "adam", optimizer_params: Mapping[str, Any] | None = None, seed: int = 0,
        device: str = "cpu", run_dir: str | Path | None = None, name: str = "fit", checkpoint_every: int = 0,
        heads: Mapping[str, nn.Module] | None = None, encoder: nn.Module | None = None,
        precision: str = "fp32", accumulate: int = 1, report: bool = True, quiet: bool = True) -> FitResult:
    """Train ``model`` (an ``nn.Module`` returning a dict task -> output) on ``tasks`` with ``method``.

    ``train``/``val``/``test`` are Datasets or DataLoaders (map-style or iterable) yielding ``(x, {task: y})``,
    or dicts task -> source yielding ``(x, y)``; a missing (None or NaN) label masks the row for that task
    (:class:`~polytask.engine.data.DatasetBatches`). ``mode`` is the aggregators' grad mode; ``representation``
    needs ``encoder`` and ``heads``. ``precision="bf16"`` runs the forward pass under autocast; ``accumulate``
    batches make one optimiser step (:class:`~polytask.engine.spec.TrainSpec`). Everything lands in ``run_dir``
    (default ``runs/<name>-<time>``); a ``run_dir`` that holds this job's checkpoint is resumed exactly (same
    weights as a run that never stopped). The run directory is locked while ``fit`` runs: a second process
    fitting into it gets a RunLockedError naming the first.
    """
    task_list = [as_task(t) for t in tasks]
    names = [t.name for t in task_list]
    if isinstance(method, MethodConfig):
        cfg = method
    else:
        cfg = MethodConfig(name=method, params=dict(method_params or {}), grad_mode=mode)  # type: ignore[arg-type]
    if cfg.grad_mode == "representation" and encoder is None:
        raise ConfigError("fit mode='representation': pass encoder= (the module giving the shared features) and "
                          "heads= (task -> module reading them)")
    wrapped = UserModel(model, task_list, heads) if encoder is None else \
        EncodedUserModel(model, task_list, heads or {}, encoder)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    comm = distributed.init_from_env()
    writes = distributed.is_writer(comm)
    if comm is not None:  # the ranks' clocks may name different default directories: rank 0's name wins
        run_dir = Path(comm.broadcast(str(run_dir)))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta = run_dir / "run.json"
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run(run_dir)  # one process per run directory (RunLockedError naming the other), given up on return
        if meta.exists():
            started = json.loads(meta.read_text()).get("started", started)
        atomic_write_json(meta, {"started": started, "fit": {"tasks": names, "method": cfg.name,
                                                             "mode": cfg.grad_mode, "epochs": epochs, "seed": seed}})
    data = DatasetBatches(task_list, train, val, test, batch_size, steps_per_epoch)
    spec = TrainSpec(
        name=name, tasks=task_list, model=wrapped,
        optimizer=registered_optimizer(optimizer, dict(optimizer_params or {}), "fit optimizer"),
        method=build_method(cfg, names), data=data, epochs=epochs,
        checkpoint=CheckpointPolicy(run_dir / "jobs" / name, checkpoint_every), seed=seed,
        device=resolve_device(device), eval_batch_size=max(data.batch_size, 256), precision=precision,
        accumulate=accumulate)
    spec.checkpoint.dir.mkdir(parents=True, exist_ok=True)
    result = {"kind": "joint", **train_job(spec, Reporter(quiet=quiet))}
    summary = _summary(task_list, result, run_dir.name, started, seed)
    if not writes:
        return FitResult(model, run_dir, result, summary)
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in result["history"]))
    atomic_write_json(run_dir / "summary.json", summary)
    if report:
        from polytask.report.html import write_report

        write_report([run_dir])
    return FitResult(model, run_dir, result, summary)


def _summary(tasks: Sequence[Task], result: dict[str, Any], run_id: str, started: str, seed: int) -> dict[str, Any]:
    """The run's summary.json in the CLI's shape (one joint method, no single-task reference)."""
    return {**header("fit", {}, tasks, seed, run_id, started, result["wall_time_s"]), "reference": None,
            "results": {result["method"]: {"kind": "joint", "method": result["method"], "tasks": result["test"],
                                           "best_epoch": result["best_epoch"], "wall_time_s": result["wall_time_s"]}},
            "mean_rank": {}}
