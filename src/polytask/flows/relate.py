"""``polytask relate``: affinity matrices from the estimators a user picks, with their cost.

Every estimator writes ``affinity_<name>.json`` (matrix, task names, estimator, cost) and
``affinity_<name>.svg`` (a heatmap) into the run directory. The probes (lookahead, grad_cosine, datamap)
share one joint training run (a hook on it, trained in this process whatever the executor: its probes' state is
read here); pairwise transfer trains every single task and every pair, independent jobs that ``config.executor``
runs (one after another, or as Ray tasks: :mod:`polytask.flows.executor`); the transferability scores read the
single-task models' frozen features (:mod:`polytask.flows.transfer`).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save as st_save

from polytask.config import Config
from polytask.engine import checkpoint
from polytask.engine.progress import Reporter
from polytask.engine.spec import CHECKPOINT, TIMING
from polytask.flows.executor import execute_all, with_executor
from polytask.flows.jobs import Job
from polytask.flows.runner import execute, job_dir_of, open_run, releases_run_locks, run_suite, single_task_job
from polytask.flows.transfer import TRANSFER_ESTIMATORS, transferability
from polytask.io import atomic_write_bytes
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.heatmap import save_heatmap
from polytask.relations.probes import PROBES, Lookahead, ProbeSet
from polytask.relations.workflow import nan_corr
from polytask.report.html import write_report
from polytask.tasks.task import TaskSuite
from polytask.tracking import refuse_tracking


def affinity_path(run_dir: Path, estimator: str) -> Path:
    return run_dir / f"affinity_{estimator}.json"

def group_job(tasks: tuple[str, ...], config: Config, prefix: str = "group") -> Job:
    """One model for ``tasks`` (a single task is its single-task baseline)."""
    if len(tasks) == 1:
        return single_task_job(tasks[0])
    return Job(f"{prefix}/{'+'.join(tasks)}", tasks, config.relate.method, "joint")

def make_probe(name: str, config: Config) -> Any:
    """The probe ``name`` as ``config.relate`` sets it up."""
    rc = config.relate
    if name == "lookahead":
        return PROBES[name](rc.every, update=rc.lookahead_update, lr=rc.lookahead_lr)
    return PROBES[name]() if name == "datamap" else PROBES[name](rc.every)

def _probe_affinities(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                      names: list[str]) -> dict[str, AffinityMatrix]:
    """Run the joint job with the requested probes on it; turn their states into matrices, each with its own
    cost (the shared joint run is reported once, as ``joint_run_time_s``)."""
    probes = ProbeSet([make_probe(n, config) for n in names])
    job = Job("relate", tuple(suite.task_names), config.relate.method, "joint")
    result = execute(job, suite, config, run_dir, reporter, hooks=[probes])
    if not probes.calls or not any(probes.calls.values()):  # finished earlier: states are in its last checkpoint
        probes.start(len(suite.tasks))
        job_dir = job_dir_of(run_dir, job)
        probes.load_state_dict(checkpoint.load(job_dir / CHECKPOINT)["hooks"][probes.name])
        if (job_dir / TIMING).exists():
            probes.load_timing(json.loads((job_dir / TIMING).read_text()).get("hooks", {}).get(probes.name, {}))
    k = len(suite.tasks)
    train_time = result["wall_time_s"] - probes.seconds
    out = {}
    for p in probes.probes:
        own = probes.cost(p.name)
        cost = {"training_runs": 1, "shared_with": names, "steps": result["steps"], "probe_calls": probes.calls[p.name],
                **own, "wall_time_s": own["probe_time_s"], "joint_run_time_s": train_time,
                "overhead_ratio": own["probe_time_s"] / train_time if train_time > 0 else None}
        if p.name == "lookahead":
            cost |= {"forward_passes": probes.calls[p.name] * (k + 1), "backward_passes": probes.calls[p.name] * k}
        elif p.name == "grad_cosine":
            cost |= {"forward_passes": probes.calls[p.name], "backward_passes": probes.calls[p.name] * k}
        raw = p.result(probes.states[p.name])
        if p.name == "datamap":
            atomic_write_bytes(run_dir / "datamap.safetensors", st_save({"features": raw.float().cpu().contiguous()},
                                                                        metadata={"tasks": ",".join(suite.task_names)}))
            cost["forward_passes"] = probes.calls[p.name]
            raw = nan_corr(raw)
        meta = {"update": p.update, "lr": p.lr} if isinstance(p, Lookahead) else {}
        out[p.name] = AffinityMatrix(raw.cpu().numpy(), suite.task_names, p.name, cost, meta=meta)
    return out

def pairwise(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter) -> AffinityMatrix:
    """Pairwise transfer (Standley et al. 2020): train every task alone and every pair together;
    affinity i->j = (L_j(alone) - L_j(with i)) / L_j(alone), validation loss at the best epoch. The K + K(K-1)/2
    models are independent: ``config.executor`` trains them (one after another, or as Ray tasks)."""
    t0 = time.perf_counter()
    names = suite.task_names
    singles = {t: single_task_job(t) for t in names}
    pairs = {(a, b): group_job((a, b), config, "pair") for a, b in itertools.combinations(names, 2)}
    results = execute_all([*singles.values(), *pairs.values()], suite, config, run_dir, reporter)
    single = {t: results[job.id]["val"][t]["loss"] for t, job in singles.items()}
    pair: dict[str, dict[str, float]] = {}
    steps = 0
    for (a, b), job in pairs.items():
        r = results[job.id]
        pair[f"{a}+{b}"] = {t: r["val"][t]["loss"] for t in (a, b)}
        steps += r["steps"]
    k = len(names)
    m = np.zeros((k, k))
    for (i, a), (j, b) in itertools.permutations(enumerate(names), 2):
        key = f"{a}+{b}" if f"{a}+{b}" in pair else f"{b}+{a}"
        m[i, j] = (single[b] - pair[key][b]) / single[b]
    cost = {"training_runs": k + k * (k - 1) // 2, "pair_steps": steps, "wall_time_s": time.perf_counter() - t0}
    return AffinityMatrix(m, names, "pairwise", cost, meta={"single_loss": single, "pair_loss": pair})

def estimate(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
             names: list[str]) -> dict[str, AffinityMatrix]:
    """The affinity matrices ``names``, computed or read back from the run directory."""
    out: dict[str, AffinityMatrix] = {}
    for n in names:
        if affinity_path(run_dir, n).exists():
            out[n] = AffinityMatrix.load(affinity_path(run_dir, n))
    todo = [n for n in names if n not in out]
    fresh: dict[str, AffinityMatrix] = {}
    probe_names = [n for n in todo if n in PROBES]
    if probe_names:
        fresh |= _probe_affinities(config, suite, run_dir, reporter, probe_names)
    if "pairwise" in todo:
        fresh["pairwise"] = pairwise(config, suite, run_dir, reporter)
    transfer = [n for n in todo if n in TRANSFER_ESTIMATORS]
    if transfer:
        fresh |= transferability(config, suite, run_dir, reporter, transfer)
    for n, aff in fresh.items():
        aff.save(affinity_path(run_dir, n))
        save_heatmap(aff, run_dir / f"affinity_{n}.svg", title=f"{n} affinity (row i -> column j)")
    return out | fresh


@releases_run_locks
def relate(config: Config | None = None, resume: str | None = None,
           reporter: Reporter | None = None, executor: str | None = None) -> tuple[Path, dict[str, AffinityMatrix]]:
    """Estimate ``config.relate.estimators`` on the configured suite; returns the run directory and matrices.
    ``executor`` (sequential or ray) overrides ``config.executor.name`` (also of a resumed run)."""
    reporter = reporter or Reporter()
    run_dir, config, _ = open_run(config, resume)
    refuse_tracking(config, "polytask relate")
    config = with_executor(config, executor)
    suite = run_suite(config, run_dir)
    affinities = estimate(config, suite, run_dir, reporter, list(config.relate.estimators))
    write_report([run_dir])
    return run_dir, affinities
