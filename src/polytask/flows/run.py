"""``polytask run``: the single-task baselines and every configured method on one suite, into one run directory
(see :mod:`polytask.flows.runner` for its layout); ``flow: advise`` hands over to :mod:`polytask.flows.advise`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from polytask.config import Config
from polytask.engine.progress import Reporter
from polytask.evaluation import delta_m, mean_rank
from polytask.flows.advise import advise
from polytask.flows.jobs import Job
from polytask.flows.runner import (
    STL,
    EpochCallback,
    execute,
    open_run,
    releases_run_locks,
    run_suite,
    single_task_job,
    summary_header,
)
from polytask.io import atomic_write_json, atomic_write_text
from polytask.report.html import write_report
from polytask.tasks.task import TaskSuite


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
        reporter: Reporter | None = None, report: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) an experiment; returns the run directory and its summary."""
    reporter = reporter or Reporter()
    run_dir, config, state = open_run(config, resume)
    suite = run_suite(config, run_dir)
    if config.flow == "advise":
        return advise(run_dir, config, state, suite, reporter, report)
    jobs = plan(config, suite)
    results: dict[str, dict[str, Any]] = {}

    def write_metrics(current: list[dict[str, Any]] | None = None) -> None:
        lines = [rec for r in results.values() for rec in r["history"]] + (current or [])
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in lines))

    for job in jobs:
        results[job.id] = execute(job, suite, config, run_dir, reporter, hooks=[EpochCallback(write_metrics)])
    write_metrics()

    wall = sum(r["wall_time_s"] for r in results.values())
    summary = summarize(config, suite, results, run_dir.name, state["started"], wall)
    atomic_write_json(run_dir / "summary.json", summary)
    if report:
        write_report([run_dir])
    return run_dir, summary
