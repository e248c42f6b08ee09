"""``polytask group``: estimate affinity, choose networks within the budget (:func:`choose_groups`, pure, in
:mod:`polytask.relations.workflow`), and prove them by training them against all-in-one, independent models and
random groupings over ``group.seeds``; writes ``groups.json`` and the report. The models of that comparison (every
strategy x seed) are independent jobs that ``config.executor`` runs (one after another, or as Ray tasks:
:mod:`polytask.flows.executor`); the affinity's own jobs follow :mod:`polytask.flows.relate`, and listed networks
measured by training them (``measured``) train one at a time in this process, as the solver asks for them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from polytask.config import Config, MethodConfig
from polytask.engine.loop import evaluate
from polytask.engine.progress import Reporter
from polytask.flows.executor import Work, execute_all, with_executor
from polytask.flows.jobs import Job
from polytask.flows.relate import estimate, group_job
from polytask.flows.runner import execute, job_dir_of, open_run, releases_run_locks, run_suite
from polytask.io import atomic_write_json
from polytask.models import build_model
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.clustering import TaskClusters
from polytask.relations.stg import MembershipEnsemble, cluster_weights
from polytask.relations.workflow import (
    NetworkSpec,
    Strategy,
    choose_groups,
    listed_networks,
    network_config,
    strategies,
)
from polytask.report.html import write_report
from polytask.tasks.task import TaskSuite
from polytask.tracking import refuse_tracking


def network_job(net: NetworkSpec, config: Config, prefix: str = "group") -> tuple[Job, Config]:
    """The job and config of one network: a plain group job, or, with model overrides, a job of its own."""
    if not net.model:
        return group_job(net.tasks, config, prefix), config
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", net.label) or "net"
    return Job(f"{prefix}-{slug}/{'+'.join(net.tasks)}", net.tasks, config.relate.method, "joint"), \
        network_config(config, net)

def measured(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter, net: NetworkSpec) -> dict[str, float]:
    """A listed network's validation loss per task, measured by training it (seed ``config.seed``)."""
    job, cfg = network_job(net, config, "net")
    result = execute(job, suite, cfg, run_dir, reporter)
    return {t: float(result["val"][t]["loss"]) for t in net.tasks}


def choose(config: Config, aff: AffinityMatrix, run_dir: Path, suite: TaskSuite, reporter: Reporter) -> Any:
    """:func:`choose_groups` with the listed networks that need it measured by training them."""
    return choose_groups(config, aff, run_dir, suite, lambda net: measured(config, suite, run_dir, reporter, net))

def _ensemble_scores(config: Config, suite: TaskSuite, run_dir: Path, jobs: list[tuple[Job, Config]],
                     membership: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Validation and test scores of STG-MTL's membership-weighted ensemble of the trained cluster models."""
    models = []
    for job, cfg in jobs:
        model = build_model(list(suite.tasks), suite.input_shape, cfg.model.backbone, cfg.model.backbone_params,
                            cfg.model.architecture, cfg.model.architecture_params, suite.categorical,
                            cfg.model.embedding_dim)
        model.load_state_dict(load_file(job_dir_of(run_dir, job) / "best.safetensors"))
        models.append(model)
    ens = MembershipEnsemble(models, membership, list(suite.tasks))
    return {split: evaluate(ens, suite.splits[split], list(suite.tasks), config.train.eval_batch_size)
            for split in ("val", "test")}

def _strategy_work(config: Config, suite: TaskSuite, st: Strategy, seed: int) -> list[Work]:
    """The models a strategy trains at training seed ``seed`` (the suite's split stays the one drawn with
    ``config.seed``): its networks, or STG-MTL's soft form's one model per cluster on every task."""
    cfg = config.model_copy(update={"seed": seed})
    if st.membership is not None:
        return [Work(Job(f"s{seed}/stg-soft/cluster-{c}", tuple(suite.task_names),
                         MethodConfig(name="static", params={"weights": weights}), "joint"), cfg, config.seed)
                for c, weights in enumerate(cluster_weights(st.membership, suite.task_names))]
    out = []
    for net in st.networks:
        job, ncfg = network_job(net, cfg)
        out.append(Work(_seeded(job, seed), ncfg, config.seed))
    return out

def _strategy_scores(config: Config, suite: TaskSuite, run_dir: Path, st: Strategy, work: list[Work],
                     results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task: validation loss and test metrics of what serves it in a strategy whose models (``work``) are
    trained (``results``)."""
    tasks = suite.task_names
    if st.membership is not None:
        scores = _ensemble_scores(config, suite, run_dir, [(w.job, w.config or config) for w in work], st.membership)
        return {t: {"val_loss": scores["val"][t]["loss"], **scores["test"][t]} for t in tasks}
    trained = [results[w.job.id] for w in work]
    serve = st.serve if st.serve is not None else {t: next(i for i, g in enumerate(st.groups) if t in g)
                                                   for t in tasks}
    return {t: {"val_loss": trained[serve[t]]["val"][t]["loss"], **trained[serve[t]]["test"][t]} for t in tasks}

def compare_groupings(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                      chosen: Any) -> dict[str, Any]:
    """Train the chosen networks and, under the same budget, all-in-one, independent and random groupings,
    over ``config.group.seeds``; every task is scored by the network that serves it (STG-MTL's soft form: by the
    membership-weighted ensemble of the cluster models). Every model of every strategy and seed is independent:
    ``config.executor`` trains them all (a model two strategies share trains once)."""
    tasks = suite.task_names
    out: dict[str, Any] = {"strategies": {}, "tasks": tasks}
    candidates = strategies(config, suite, chosen)
    plans = {(name, s): _strategy_work(config, suite, st, s) for name, st in candidates.items()
             for s in config.group.seeds}
    results = execute_all([w for work in plans.values() for w in work], suite, config, run_dir, reporter)
    for name, st in candidates.items():
        per_seed = []
        for s in config.group.seeds:
            cfg = config.model_copy(update={"seed": s})
            per_task = _strategy_scores(cfg, suite, run_dir, st, plans[name, s], results)
            per_seed.append({"seed": s, "tasks": per_task,
                             "total_val_loss": float(sum(v["val_loss"] for v in per_task.values()))})
        totals = np.array([p["total_val_loss"] for p in per_seed])
        entry = {"groups": st.groups, "models": len(st.networks), "costs": [n.cost for n in st.networks],
                 "labels": [n.label for n in st.networks], "total_cost": float(sum(n.cost for n in st.networks)),
                 "serve": st.serve, "seeds": per_seed, "total_val_loss_mean": float(totals.mean()),
                 "total_val_loss_std": float(totals.std())}
        if st.membership is not None:
            entry |= {"form": "stg-soft", "membership": st.membership.tolist()}
        out["strategies"][name] = entry
    return out

def _seeded(job: Job, seed: int) -> Job:
    return Job(f"s{seed}/{job.id}", job.tasks, job.method, job.kind)

def study(config: Config, suite: TaskSuite, run_dir: Path,
          reporter: Reporter) -> tuple[AffinityMatrix, dict[str, Any]]:
    """The grouping study of a run: the ``group.estimator`` affinity, the networks chosen within the budget, and
    their comparison with all-in-one, independent and random groupings; written to groups.json and returned."""
    listed_networks(config, suite)  # check the listed networks before anything trains
    aff = estimate(config, suite, run_dir, reporter, [config.group.estimator])[config.group.estimator]
    chosen = choose(config, aff, run_dir, suite, reporter)
    comparison = compare_groupings(config, suite, run_dir, reporter, chosen)
    grouping = chosen.to_grouping() if isinstance(chosen, TaskClusters) else chosen
    summary = {"estimator": aff.estimator, "affinity_cost": aff.cost, "budget": config.group.budget,
               "grouping": grouping.to_json(), "planted_groups": suite.info.get("planted_groups"), **comparison}
    if isinstance(chosen, TaskClusters):
        summary["stg_form"] = config.group.stg_form
    atomic_write_json(run_dir / "groups.json", summary)
    return aff, summary


@releases_run_locks
def group(config: Config | None = None, resume: str | None = None,
          reporter: Reporter | None = None, executor: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Estimate affinity, choose networks within the budget, prove them by training; write groups.json.
    ``executor`` (sequential or ray) overrides ``config.executor.name`` (also of a resumed run)."""
    reporter = reporter or Reporter()
    run_dir, config, _ = open_run(config, resume)
    refuse_tracking(config, "polytask group")
    config = with_executor(config, executor)
    _, summary = study(config, run_suite(config, run_dir), run_dir, reporter)
    write_report([run_dir])
    return run_dir, summary
