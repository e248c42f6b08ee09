"""A run: single-task baselines and every configured method on one suite, into one run directory.

Layout of a run directory::

    config.yaml        the resolved configuration
    metrics.jsonl      one line per job, epoch, split and task
    summary.json       test metrics at the best-validation epoch, Δm%, mean rank, wall time, versions
    report.html        a self-contained page
    jobs/<job>/        last.safetensors (resumable state), best.safetensors (weights), result.json
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polytask
from polytask.config import Config, MethodConfig, check, dump_config, load_config
from polytask.engine.loop import Job, train_job
from polytask.engine.progress import Reporter
from polytask.errors import CheckpointError, ConfigError
from polytask.evaluation import delta_m, mean_rank
from polytask.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from polytask.tasks import build_suite
from polytask.tasks.task import TaskSuite

STL = "stl"


def single_task_job(task: str) -> Job:
    """The single-task baseline of ``task`` (same backbone and budget, one head)."""
    return Job(f"{STL}/{task}", (task,), MethodConfig(name="equal"), "single_task")


def plan(config: Config, suite: TaskSuite) -> list[Job]:
    """The jobs of a run: one single-task job per task (if asked), then one joint job per method."""
    jobs = []
    if config.baselines.single_task:
        jobs += [single_task_job(t) for t in suite.task_names]
    jobs += [Job(m.label, tuple(suite.task_names), m, "joint") for m in config.methods]
    return jobs


def cache_dir() -> Path:
    return Path(os.environ.get("POLYTASK_CACHE_DIR", Path.home() / ".cache" / "polytask"))


def stl_cache_key(config: Config, task: str) -> str:
    """Single-task results depend on the suite, model, training budget, seed, task and library version."""
    blob = json.dumps({
        "suite": config.suite.model_dump(mode="json"), "model": config.model.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"), "seed": config.seed, "task": task,
        "version": polytask.__version__,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def job_dir_of(run_dir: Path, job: Job) -> Path:
    return run_dir / "jobs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", job.id.replace("/", "__"))


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "polytask": polytask.__version__}


def summarize(config: Config, suite: TaskSuite, results: dict[str, dict[str, Any]], run_id: str,
              started: str, wall_time: float) -> dict[str, Any]:
    """Combine job results into the run summary (per method: test metrics, Δm%, mean rank, time)."""
    methods: dict[str, dict[str, Any]] = {}
    stl_jobs = [r for r in results.values() if r["kind"] == "single_task"]
    if stl_jobs:
        methods[STL] = {
            "kind": "single_task", "method": STL,
            "tasks": {t: s for r in stl_jobs for t, s in r["test"].items()},
            "best_epoch": {r["tasks"][0]: r["best_epoch"] for r in stl_jobs},
            "wall_time_s": sum(r["wall_time_s"] for r in stl_jobs),
        }
    for r in results.values():
        if r["kind"] == "joint":
            methods[r["job"]] = {"kind": "joint", "method": r["method"], "tasks": r["test"],
                                 "best_epoch": r["best_epoch"], "wall_time_s": r["wall_time_s"]}
    directions = {t.name: {m.name: m.higher_is_better for m in t.metrics} for t in suite.tasks}
    reference = STL if STL in methods and len(stl_jobs) == len(suite.tasks) else None
    if reference:
        for m in methods.values():
            m["delta_m"], m["delta_m_per_task"] = delta_m(m["tasks"], methods[reference]["tasks"], directions)
    ranks = mean_rank({k: v["tasks"] for k, v in methods.items()}, directions) if len(methods) > 1 else {}
    return {
        "polytask_version": polytask.__version__, "run_id": run_id,
        "suite": {"name": suite.name, "params": config.suite.params,
                  "tasks": [{"name": t.name, "kind": t.kind, "n_outputs": t.n_outputs,
                             "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better}
                                         for m in t.metrics]} for t in suite.tasks]},
        "seed": config.seed, "versions": versions(), "started": started, "wall_time_s": wall_time,
        "reference": reference, "results": methods, "mean_rank": ranks,
    }


def execute(job: Job, suite: TaskSuite, config: Config, run_dir: Path, reporter: Reporter,
            on_epoch: Any = None, probes: Any = None) -> dict[str, Any]:
    """A job's result: read if finished, copied from the single-task cache if there, else trained
    (resuming its checkpoint if one exists); single-task results go into the cache."""
    job_dir = job_dir_of(run_dir, job)
    done = job_dir / "result.json"
    cached = cache_dir() / "stl" / stl_cache_key(config, job.tasks[0]) if job.kind == "single_task" else None
    if not done.exists() and cached is not None and config.baselines.cache and (cached / "result.json").exists():
        _copy_result(cached, job_dir)
        reporter.log(f"[{job.id}] single-task result reused from cache {cached}")
    if done.exists():
        return json.loads(done.read_text())
    job_dir.mkdir(parents=True, exist_ok=True)
    result = train_job(job, suite, config, job_dir, reporter, on_epoch=on_epoch, probes=probes)
    atomic_write_json(done, result)
    if cached is not None and config.baselines.cache:
        _copy_result(job_dir, cached)
    return result


def _copy_result(src: Path, dst: Path) -> None:
    """Copy a finished job's weights, then its result (the marker of completion), each atomically."""
    for name in ("best.safetensors", "result.json"):
        atomic_write_bytes(dst / name, (src / name).read_bytes())


def _new_run_dir(config: Config) -> Path:
    name = config.output.name or f"{config.suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.output.dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists; use --resume {run_dir} to continue it, "
                          "or set output.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def open_run(config: Config | None, resume: str | os.PathLike[str] | None) -> tuple[Path, Config, dict[str, Any]]:
    """A new run directory for ``config`` (its resolved config saved), or the existing one at ``resume``
    with its saved config; returns (run directory, config, run state)."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
        config = load_config(run_dir / "config.yaml")
        state = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    else:
        config = check(config or Config())
        run_dir = _new_run_dir(config)
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
        state = {}
    state.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write_json(run_dir / "run.json", state)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    return run_dir, config, state


def run(config: Config | None = None, resume: str | os.PathLike[str] | None = None,
        reporter: Reporter | None = None, report: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) an experiment; returns the run directory and its summary."""
    reporter = reporter or Reporter()
    run_dir, config, state = open_run(config, resume)
    suite = build_suite(config.suite.name, config.suite.params, config.seed)
    jobs = plan(config, suite)
    results: dict[str, dict[str, Any]] = {}

    def write_metrics(current: list[dict[str, Any]] | None = None) -> None:
        lines = [rec for r in results.values() for rec in r["history"]] + (current or [])
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in lines))

    for job in jobs:
        results[job.id] = execute(job, suite, config, run_dir, reporter, on_epoch=write_metrics)
    write_metrics()

    wall = sum(r["wall_time_s"] for r in results.values())
    summary = summarize(config, suite, results, run_dir.name, state["started"], wall)
    atomic_write_json(run_dir / "summary.json", summary)
    if report:
        from polytask.report.html import write_report

        write_report([run_dir])
    return run_dir, summary
