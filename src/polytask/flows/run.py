"""``polytask run``: the single-task baselines and every configured method on one suite, into one run directory
(see :mod:`polytask.flows.runner` for its layout); ``flow: advise`` hands over to :mod:`polytask.flows.advise`.
The jobs are independent: ``config.executor`` trains them one after another in this process or as Ray tasks
(:mod:`polytask.flows.executor`); this process writes metrics.jsonl, summary.json and the report either way."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polytask.config import Config
from polytask.engine import distributed
from polytask.engine.distributed import is_writer
from polytask.engine.hooks import Hook
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError
from polytask.evaluation import delta_m, mean_rank
from polytask.flows.advise import advise
from polytask.flows.executor import execute_all, with_executor
from polytask.flows.jobs import Job
from polytask.flows.runner import (
    STL,
    EpochCallback,
    open_run,
    releases_run_locks,
    run_suite,
    single_task_job,
    summary_header,
)
from polytask.io import atomic_write_json, atomic_write_text
from polytask.report.html import write_report
from polytask.tasks.task import TaskSuite
from polytask.tracking import open_trackers, refuse_tracking


def plan(config: Config, suite: TaskSuite) -> list[Job]:
    """The jobs of a run: one single-task job per task (if asked), then one joint job per method."""
    jobs = []
    if config.baselines.single_task:
        jobs += [single_task_job(t) for t in suite.task_names]
    jobs += [Job(m.label, tuple(suite.task_names), m, "joint") for m in config.methods]
    return jobs


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
    return {**summary_header(config, suite, run_id, started, wall_time),
            "reference": reference, "results": methods, "mean_rank": ranks}


@releases_run_locks
def run(config: Config | None = None, resume: str | os.PathLike[str] | None = None,
        reporter: Reporter | None = None, report: bool = True, executor: str | None = None,
        hooks: Sequence[Hook] = ()) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) an experiment; returns the run directory and its summary. ``executor`` (sequential or ray)
    overrides ``config.executor.name`` (also of a resumed run); ``hooks`` ride on every job (with Ray: pickled and
    run in the workers, see :mod:`polytask.flows.executor`)."""
    reporter = reporter or Reporter()
    run_dir, config, state = open_run(config, resume)
    config = with_executor(config, executor)
    suite = run_suite(config, run_dir)
    writes = is_writer()  # under torchrun, rank 0 alone writes the run's files (polytask.engine.distributed)
    if config.flow == "advise":
        if distributed.current() is not None:
            raise ConfigError("flow: advise is not supported under torchrun; run it in one process")
        refuse_tracking(config, "flow: advise")
        return advise(run_dir, config, state, suite, reporter, report)
    if distributed.current() is not None and config.executor.name != "sequential":
        raise ConfigError("executor.name: under torchrun the ranks train each job together; use the sequential "
                          "executor (or Ray without torchrun)")
    jobs = plan(config, suite)
    results: dict[str, dict[str, Any]] = {}

    def write_metrics(current: list[dict[str, Any]] | None = None) -> None:
        if not writes:
            return
        lines = [rec for r in results.values() for rec in r["history"]] + (current or [])
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in lines))

    trackers = open_trackers(config, run_dir, state["started"])

    def finished(job: Job, result: dict[str, Any]) -> None:
        results[job.id] = result
        trackers.job_done(job.id, result)
        write_metrics()

    # the live rewrite after every epoch needs this process: Ray's workers get only the caller's hooks
    live = [EpochCallback(write_metrics)] if config.executor.name == "sequential" else []
    results = dict(execute_all(jobs, suite, config, run_dir, reporter,
                               hooks_for=lambda job: [*live, *hooks, *trackers.hooks_for(job)], on_result=finished))
    write_metrics()

    wall = sum(r["wall_time_s"] for r in results.values())
    summary = summarize(config, suite, results, run_dir.name, state["started"], wall)
    if not writes:
        return run_dir, summary
    atomic_write_json(run_dir / "summary.json", summary)
    trackers.finish(summary, run_dir / "summary.json")
    if report:
        write_report([run_dir])
    return run_dir, summary
