"""``flow: advise`` (the default experiment): which tasks help each other and how to learn them, in one run.

1. a cheap affinity estimate (``group.estimator``, from one joint run) with its cost;
2. the networks chosen under ``group.budget``;
3. the chosen grouping trained against all-in-one, independent models and ``group.random_groupings`` random
   groupings, and the chosen multi-task networks trained again with every method of ``methods``;
4. the verdict (:func:`polytask.evaluation.verdict.verdict`): the plan with the lowest validation loss, in a
   sentence. ``summary.json`` holds every plan as a row (Δm% against independent models), ``groups.json`` the
   grouping study, ``report.html`` opens on the verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from polytask.config import Config
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError
from polytask.evaluation import delta_m, mean_rank
from polytask.evaluation.verdict import Plan, verdict
from polytask.flows.group import study
from polytask.flows.jobs import Job
from polytask.flows.runner import execute, summary_header
from polytask.io import atomic_write_json
from polytask.report.html import write_report
from polytask.tasks.task import TaskSuite


def _mean_over_seeds(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per task and key, the mean over seeds."""
    first = per_seed[0]
    return {t: {k: float(np.mean([s[t][k] for s in per_seed])) for k in first[t]} for t in first}


def _method_runs(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                 groups: list[list[str]]) -> dict[str, list[dict[str, dict[str, float]] | None]]:
    """Each method of ``config.methods`` (other than the relations method) on each multi-task network of
    ``groups``, over ``group.seeds``: method label -> per network (None for a single task) -> task -> mean
    validation loss and test metrics."""
    out: dict[str, list[dict[str, dict[str, float]] | None]] = {}
    for m in config.methods:
        if m.label == config.relate.method.label:
            continue
        out[m.label] = []
        for g in groups:
            if len(g) == 1:
                out[m.label].append(None)
                continue
            per_seed = []
            for s in config.group.seeds:
                job = Job(f"s{s}/{m.label}/{'+'.join(g)}", tuple(g), m, "joint")
                r = execute(job, suite, config.model_copy(update={"seed": s}), run_dir, reporter,
                            split_seed=config.seed)
                per_seed.append({t: {"val_loss": r["val"][t]["loss"], **r["test"][t]} for t in g})
            out[m.label].append(_mean_over_seeds(per_seed))
    return out


def plans(config: Config, comparison: dict[str, Any],
          by_method: dict[str, list[dict[str, dict[str, float]] | None]]) -> list[Plan]:
    """Every grouping of the study with the relations method, and the chosen grouping with each other method on
    its multi-task networks (its single-task networks unchanged)."""
    base = config.relate.method.label
    out = []
    for name, st in comparison["strategies"].items():
        out.append(Plan(name, st["groups"], [base] * len(st["groups"]),
                        _mean_over_seeds([p["tasks"] for p in st["seeds"]]), st["serve"]))
    chosen = next(p for p in out if p.name == "chosen")
    for label, networks in by_method.items():
        tasks = {}
        for i, served in enumerate(chosen.served()):
            tasks |= {t: (networks[i] or chosen.tasks)[t] for t in served}
        methods = [label if len(g) > 1 else base for g in chosen.groups]
        out.append(Plan(f"chosen + {label}", chosen.groups, methods, tasks, chosen.serve))
    return out


def advise(run_dir: Path, config: Config, state: dict[str, Any], suite: TaskSuite, reporter: Reporter,
           report: bool = True) -> tuple[Path, dict[str, Any]]:
    """Estimate affinity, choose groups, prove them by training with the methods, write the verdict."""
    if config.group.estimator == "datamap" and config.group.stg_form == "soft":
        raise ConfigError("flow advise: group.stg_form soft serves every task by an ensemble of all-task models; "
                          "set group.stg_form: hard or another group.estimator")
    aff, comparison = study(config, suite, run_dir, reporter)
    groups = comparison["strategies"]["chosen"]["groups"]
    candidates = plans(config, comparison, _method_runs(config, suite, run_dir, reporter, groups))
    directions = {t.name: {m.name: m.higher_is_better for m in t.metrics} for t in suite.tasks}
    advice = verdict(candidates, directions)

    reference = next(p for p in candidates if p.name == "independent").test()
    results = {}
    for p in candidates:
        dm, per_task = delta_m(p.test(), reference, directions)
        results[p.name] = {"kind": "plan", "method": ", ".join(sorted(set(p.methods))), "groups": p.groups,
                           "tasks": p.test(), "total_val_loss": p.total_val_loss, "delta_m": dm,
                           "delta_m_per_task": per_task}
    ranks = mean_rank({k: v["tasks"] for k, v in results.items()}, directions)
    wall = sum(json.loads(p.read_text())["wall_time_s"] for p in sorted(run_dir.glob("jobs/*/result.json")))
    summary = {**summary_header(config, suite, run_dir.name, state["started"], wall),
               "flow": "advise", "reference": "independent", "results": results, "mean_rank": ranks,
               "verdict": advice, "affinity": {"estimator": aff.estimator, "cost": aff.cost}}
    atomic_write_json(run_dir / "summary.json", summary)
    if report:
        write_report([run_dir])
    return run_dir, summary
