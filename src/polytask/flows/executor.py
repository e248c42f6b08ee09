"""Where a flow's independent jobs train: one after another in this process (``sequential``, the default) or as Ray
tasks on a local or existing cluster (``ray``, the optional extra ``pip install 'polytask[ray]'``).

:func:`execute_all` is :func:`~polytask.flows.runner.execute` over a list of jobs that do not depend on each other
(``run``'s single-task baselines and methods, ``relate``'s pairwise singles and pairs, ``group``'s candidate
groupings over seeds, a merge experiment's per-task fine-tunes). Both executors return the same results in the same
order and leave the same files in the run directory: each job is deterministic from its seed (``config.seed +
job.seed_offset``) and trains with ``config.train.threads`` torch threads wherever it runs.

What runs where with Ray:

- The driver (this process) holds the run directory's lock, writes what the flow writes (``metrics.jsonl``,
  ``summary.json``, the report, ``affinity_*.json``), and logs each job as it finishes.
- Each job is one Ray task running :func:`~polytask.flows.runner.execute` in a worker process: it trains (resuming
  ``last.safetensors`` if its job directory holds one) and writes its job directory (``last.safetensors``,
  ``best.safetensors``, ``result.json``, ``timing.json``) and the single-task result cache, as the sequential
  executor would. Shipped to the worker: the suite (once per call, through Ray's object store), the job, its
  config, the run directory's absolute path, the hooks ``hooks_for`` gives it, the split seed, and the driver's
  working directory (the worker changes to it when its node has it, so relative paths in the config resolve as in
  the driver).
- A worker that dies mid-job (killed, out of memory) is replaced and its task run again, up to
  ``executor.max_retries`` times; the job resumes from its own checkpoint, so its result is the uninterrupted one.

Limits:

- The run directory (and the single-task cache, ``POLYTASK_CACHE_DIR``) must be the same path on every node: a
  local cluster, or a cluster on a shared file system. Workers need polytask and the same library versions.
- Hooks are pickled (cloudpickle) and run in the worker: their side effects (files they write, state they keep)
  happen there, never in the driver. A hook that only makes sense in the driver (``run``'s live rewrite of
  ``metrics.jsonl`` after every epoch) is given only to the sequential executor; with Ray the driver rewrites it
  as each job finishes (``on_result``). A hook that cannot be pickled (holding a lock, an open file) fails the call.
- ``train.threads: 0`` (torch's default) means different thread counts in the driver and in a Ray worker (Ray sets
  one per reserved CPU), so results may then differ in the last bits; set ``train.threads`` for equal results.
- Each task reserves ``max(1, train.threads)`` CPUs; ``executor.workers`` caps the jobs in flight (0: the
  cluster's CPUs). A Ray already initialised in this process (``ray.init`` by the caller) is used as it is, and a
  local cluster started here stays up until the process ends (later calls reuse it).
- A job that raises (bad data, divergence) stops the call with that error after the jobs in flight are cancelled;
  finished jobs keep their results, so resuming the run trains only the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polytask.config import Config, ExecutorConfig
from polytask.engine.hooks import Hook
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError, PolytaskError
from polytask.flows.jobs import Job
from polytask.flows.runner import execute
from polytask.tasks.task import TaskSuite

HooksFor = Callable[[Job], Sequence[Hook]]
OnResult = Callable[[Job, dict[str, Any]], None]


@dataclass(frozen=True)
class Work:
    """One independent job of a flow with the config it trains with (when not the flow's) and the seed its suite's
    split was drawn with (when not ``config.seed``: a comparison over training seeds)."""

    job: Job
    config: Config | None = None
    split_seed: int | None = None


class ExecutorError(PolytaskError):
    """A job could not be run by the executor (its worker died more often than ``executor.max_retries``)."""


def as_work(items: Iterable[Job | Work]) -> list[Work]:
    """Jobs and work items as work items, each job id once (the first occurrence wins: the same id is the same job,
    which the sequential executor would only have read back)."""
    out: dict[str, Work] = {}
    for item in items:
        w = item if isinstance(item, Work) else Work(item)
        out.setdefault(w.job.id, w)
    return list(out.values())


def with_executor(config: Config, name: str | None) -> Config:
    """``config`` with ``executor.name`` set to ``name`` (None: unchanged); the executor never changes results, so
    a run may be resumed with another one."""
    if name is None or name == config.executor.name:
        return config
    return config.model_copy(update={"executor": config.executor.model_copy(update={"name": name})})


def execute_all(jobs: Sequence[Job | Work], suite: TaskSuite, config: Config, run_dir: Path, reporter: Reporter,
                hooks_for: HooksFor | None = None, on_result: OnResult | None = None,
                executor: ExecutorConfig | None = None) -> dict[str, dict[str, Any]]:
    """Every job's result (see :func:`~polytask.flows.runner.execute`), keyed by job id in the order of ``jobs``,
    trained by ``executor`` (default ``config.executor``). ``hooks_for(job)`` gives the hooks riding on a job (with
    Ray: pickled and run in the worker); ``on_result(job, result)`` is called in this process as each job finishes
    (sequential: in order; Ray: in the order they finish)."""
    ex = executor or config.executor
    work = as_work(jobs)
    if ex.name == "sequential" or not work:
        return _sequential(work, suite, config, run_dir, reporter, hooks_for, on_result)
    if ex.name == "ray":
        return _ray(work, suite, config, run_dir, reporter, hooks_for, on_result, ex)
    raise ConfigError(f"executor.name: unknown executor {ex.name!r}; use sequential or ray")


def _sequential(work: list[Work], suite: TaskSuite, config: Config, run_dir: Path, reporter: Reporter,
                hooks_for: HooksFor | None, on_result: OnResult | None) -> dict[str, dict[str, Any]]:
    """Today's behaviour: each job in this process, one after another."""
    results: dict[str, dict[str, Any]] = {}
    for w in work:
        hooks = hooks_for(w.job) if hooks_for is not None else ()
        results[w.job.id] = execute(w.job, suite, w.config or config, run_dir, reporter, hooks, w.split_seed)
        if on_result is not None:
            on_result(w.job, results[w.job.id])
    return results


def run_in_worker(job: Job, suite: TaskSuite, config: Config, run_dir: str, hooks: Sequence[Hook],
                  split_seed: int | None, cwd: str = "") -> dict[str, Any]:
    """The body of one Ray task: :func:`execute` with the job's thread count, quiet (the driver logs progress), in
    the driver's working directory ``cwd`` when this node has it (relative paths in the config resolve as there)."""
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    return execute(job, suite, config, Path(run_dir), Reporter(quiet=True), hooks, split_seed)


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor.name: ray is not installed; pip install 'polytask[ray]'") from None
    return ray


def connect(ex: ExecutorConfig) -> Any:
    """Ray, initialised: as the caller left it if already initialised, else a local cluster started in this process
    (``address: ''``) or the cluster at ``ex.address`` ('auto', ``ray://host:port``)."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=ex.address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def workers_of(ex: ExecutorConfig, cluster_cpus: float, cpus_per_job: int) -> int:
    """Jobs in flight at once: ``ex.workers``, or (0) as many as the cluster's CPUs hold; at least one."""
    return max(1, ex.workers or int(cluster_cpus // cpus_per_job))


def _ray(work: list[Work], suite: TaskSuite, config: Config, run_dir: Path, reporter: Reporter,
         hooks_for: HooksFor | None, on_result: OnResult | None, ex: ExecutorConfig) -> dict[str, dict[str, Any]]:
    """Each job as a Ray task, at most ``workers_of`` in flight; results in the order of ``work``."""
    ray = connect(ex)
    cpus = max(1, config.train.threads)
    task = ray.remote(run_in_worker).options(num_cpus=cpus, max_retries=ex.max_retries, retry_exceptions=False)
    width = workers_of(ex, ray.cluster_resources().get("CPU", 1), cpus)
    suite_ref = ray.put(suite)
    root = str(Path(run_dir).resolve())
    pending = list(reversed(work))
    flight: dict[Any, tuple[Work, float]] = {}
    results: dict[str, dict[str, Any]] = {}
    reporter.log(f"ray: {len(work)} jobs, {width} at a time, on {ray.cluster_resources().get('CPU', 0):g} CPUs")
    try:
        while pending or flight:
            while pending and len(flight) < width:
                w = pending.pop()
                hooks = list(hooks_for(w.job)) if hooks_for is not None else []
                ref = task.remote(w.job, suite_ref, w.config or config, root, hooks, w.split_seed, os.getcwd())
                flight[ref] = (w, time.perf_counter())
            [ref], _ = ray.wait(list(flight), num_returns=1)
            w, t0 = flight.pop(ref)
            results[w.job.id] = _get(ray, ref, w.job)
            reporter.log(f"[{w.job.id}] finished ({len(results)}/{len(work)}, {time.perf_counter() - t0:.1f} s)")
            if on_result is not None:
                on_result(w.job, results[w.job.id])
    finally:
        for ref in flight:
            ray.cancel(ref, force=True)
    return {w.job.id: results[w.job.id] for w in work}


def _get(ray: Any, ref: Any, job: Job) -> dict[str, Any]:
    """A finished task's result; the job's own error re-raised as it was, a dead worker as ExecutorError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
        raise ExecutorError(f"job {job.id}: its Ray worker died more often than executor.max_retries allows "
                            f"({e})") from None
