"""`polytask relate`: affinity matrices from the estimators a user picks, with their cost.

Every estimator writes ``affinity_<name>.json`` (matrix, task names, estimator, cost) and
``affinity_<name>.svg`` (a heatmap) into the run directory. The probes (lookahead, grad_cosine, datamap)
share one joint training run; pairwise transfer trains every single task and every pair; the
transferability scores read the single-task models' frozen features.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from polytask.config import Config
from polytask.engine import checkpoint
from polytask.engine.loop import CHECKPOINT, Job
from polytask.engine.progress import Reporter
from polytask.experiment import execute, job_dir_of, open_run, releases_run_locks, run_suite, single_task_job
from polytask.io import atomic_write_bytes
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.heatmap import save_heatmap
from polytask.relations.probes import PROBES, Lookahead, ProbeSet
from polytask.tasks.task import TaskSuite


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
    result = execute(job, suite, config, run_dir, reporter, probes=probes)
    if not probes.calls or not any(probes.calls.values()):  # finished earlier: states are in its last checkpoint
        probes.start(len(suite.tasks))
        probes.load(checkpoint.load(job_dir_of(run_dir, job) / CHECKPOINT)["probes"])
    k = len(suite.tasks)
    train_time = result["wall_time_s"] - result.get("probe_time_s", probes.seconds)
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
            raw = _nan_corr(raw)
        meta = {"update": p.update, "lr": p.lr} if isinstance(p, Lookahead) else {}
        out[p.name] = AffinityMatrix(raw.cpu().numpy(), suite.task_names, p.name, cost, meta=meta)
    return out


def _nan_corr(features: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between task feature rows over the samples both tasks label."""
    f = features.double().cpu().numpy()
    k = f.shape[0]
    out = np.eye(k)
    for i, j in itertools.combinations(range(k), 2):
        both = ~(np.isnan(f[i]) | np.isnan(f[j]))
        a, b = f[i, both] - f[i, both].mean(), f[j, both] - f[j, both].mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        out[i, j] = out[j, i] = float((a * b).sum() / denom) if denom > 0 else 0.0
    return torch.from_numpy(out)


def pairwise(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter) -> AffinityMatrix:
    """Pairwise transfer (Standley et al. 2020): train every task alone and every pair together;
    affinity i->j = (L_j(alone) - L_j(with i)) / L_j(alone), validation loss at the best epoch."""
    t0 = time.perf_counter()
    names = suite.task_names
    single = {t: execute(single_task_job(t), suite, config, run_dir, reporter)["val"][t]["loss"] for t in names}
    pair: dict[str, dict[str, float]] = {}
    steps = 0
    for a, b in itertools.combinations(names, 2):
        r = execute(group_job((a, b), config, "pair"), suite, config, run_dir, reporter)
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
    transfer = [n for n in todo if n in ("logme", "leep", "hscore", "nce")]
    if transfer:
        from polytask.relations.frozen import transferability

        fresh |= transferability(config, suite, run_dir, reporter, transfer)
    for n, aff in fresh.items():
        aff.save(affinity_path(run_dir, n))
        save_heatmap(aff, run_dir / f"affinity_{n}.svg", title=f"{n} affinity (row i -> column j)")
    return out | fresh


@releases_run_locks
def relate(config: Config | None = None, resume: str | None = None,
           reporter: Reporter | None = None) -> tuple[Path, dict[str, AffinityMatrix]]:
    """Estimate ``config.relate.estimators`` on the configured suite; returns the run directory and matrices."""
    reporter = reporter or Reporter()
    run_dir, config, _ = open_run(config, resume)
    suite = run_suite(config, run_dir)
    affinities = estimate(config, suite, run_dir, reporter, list(config.relate.estimators))
    _write_relations_report(run_dir)
    return run_dir, affinities


def _write_relations_report(run_dir: Path) -> Any:
    from polytask.report.html import write_report

    return write_report([run_dir])


# ---------------------------------------------------------------- polytask group


def pair_losses(aff: AffinityMatrix) -> AffinityMatrix:
    """The pairwise-transfer run as Standley's table: [i, j] = L_j({i, j}), diagonal L_j({j}) (lower is better)."""
    single, pair = aff.meta["single_loss"], aff.meta["pair_loss"]
    names = aff.tasks
    m = np.array([[single[b] if a == b else pair.get(f"{a}+{b}", pair.get(f"{b}+{a}", {})).get(b, np.nan)
                   for b in names] for a in names])
    return AffinityMatrix(m, names, "pairwise_loss", aff.cost, higher_is_better=False)


def choose_groups(config: Config, aff: AffinityMatrix, run_dir: Path) -> Any:
    """Solve the grouping problem for ``config.group`` on ``aff``: TAG's score (Standley's HOA for pairwise)
    with exact or beam selection; for data maps, STG-MTL clustering of the tasks' data-map features."""
    from polytask.relations.clustering import cluster_tasks
    from polytask.relations.grouping import HoaScore, TagScore, select_beam, select_exact

    gc = config.group
    if aff.estimator == "datamap":
        feats = load_file(run_dir / "datamap.safetensors")["features"].double()
        feats = torch.where(torch.isnan(feats), torch.nanmean(feats, dim=0, keepdim=True), feats)
        return cluster_tasks(feats.numpy(), aff.tasks, gc.budget, seed=config.seed).to_grouping()
    score = HoaScore(pair_losses(aff)) if aff.estimator == "pairwise" else TagScore(aff)
    exact = gc.solver == "exact" or (gc.solver == "auto" and len(aff.tasks) <= 16)
    if exact:
        return select_exact(score, aff.tasks, gc.budget, gc.max_group_size)
    return select_beam(score, aff.tasks, gc.budget, max_group_size=gc.max_group_size)


def random_partition(tasks: list[str], n_groups: int, seed: int) -> list[list[str]]:
    """A uniformly shuffled split of ``tasks`` into ``n_groups`` non-empty groups (seeded)."""
    rng = np.random.default_rng(seed)
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    n = min(n_groups, len(tasks))
    cuts = sorted(rng.choice(np.arange(1, len(tasks)), size=n - 1, replace=False)) if n > 1 else []
    bounds = [0, *cuts, len(tasks)]
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _serve(groups: list[list[str]], assignment: dict[str, int] | None, tasks: list[str]) -> dict[str, int]:
    if assignment is not None:
        return assignment
    return {t: next(i for i, g in enumerate(groups) if t in g) for t in tasks}


def compare_groupings(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                      chosen: Any) -> dict[str, Any]:
    """Train the chosen groups and, under the same budget, all-in-one, independent and random groupings,
    over ``config.group.seeds``; every task is scored by the model of the group that serves it."""
    tasks = suite.task_names
    gc = config.group
    strategies: dict[str, tuple[list[list[str]], dict[str, int] | None]] = {
        "chosen": (chosen.groups, chosen.assignment),
        "all-in-one": ([list(tasks)], None),
        "independent": ([[t] for t in tasks], None),
    }
    for r in range(gc.random_groupings):
        strategies[f"random-{r}"] = (random_partition(tasks, gc.budget, config.seed * 7919 + r), None)
    out: dict[str, Any] = {"strategies": {}, "tasks": tasks}
    for name, (groups, assignment) in strategies.items():
        serve = _serve(groups, assignment, tasks)
        per_seed = []
        for s in gc.seeds:
            cfg = config.model_copy(update={"seed": s})
            # the suite's split was drawn with the run's seed; only the training seed is s
            results = [execute(_seeded(group_job(tuple(g), cfg), s), suite, cfg, run_dir, reporter,
                               split_seed=config.seed) for g in groups]
            per_task = {t: {"val_loss": results[serve[t]]["val"][t]["loss"], **results[serve[t]]["test"][t]}
                        for t in tasks}
            per_seed.append({"seed": s, "tasks": per_task,
                             "total_val_loss": float(sum(v["val_loss"] for v in per_task.values()))})
        totals = np.array([p["total_val_loss"] for p in per_seed])
        out["strategies"][name] = {"groups": groups, "serve": serve, "models": len(groups), "seeds": per_seed,
                                   "total_val_loss_mean": float(totals.mean()),
                                   "total_val_loss_std": float(totals.std())}
    return out


def _seeded(job: Job, seed: int) -> Job:
    return Job(f"s{seed}/{job.id}", job.tasks, job.method, job.kind)


@releases_run_locks
def group(config: Config | None = None, resume: str | None = None,
          reporter: Reporter | None = None) -> tuple[Path, dict[str, Any]]:
    """Estimate affinity, choose groups under the budget, prove them by training; write groups.json."""
    from polytask.io import atomic_write_json

    reporter = reporter or Reporter()
    run_dir, config, _ = open_run(config, resume)
    suite = run_suite(config, run_dir)
    aff = estimate(config, suite, run_dir, reporter, [config.group.estimator])[config.group.estimator]
    chosen = choose_groups(config, aff, run_dir)
    comparison = compare_groupings(config, suite, run_dir, reporter, chosen)
    summary = {"estimator": aff.estimator, "affinity_cost": aff.cost, "budget": config.group.budget,
               "grouping": chosen.to_json(), "planted_groups": suite.info.get("planted_groups"), **comparison}
    atomic_write_json(run_dir / "groups.json", summary)
    _write_relations_report(run_dir)
    return run_dir, summary
