"""`polytask relate`: affinity matrices from the estimators a user picks, with their cost.

Every estimator writes ``affinity_<name>.json`` (matrix, task names, estimator, cost) and
``affinity_<name>.svg`` (a heatmap) into the run directory. The probes (lookahead, grad_cosine, datamap)
share one joint training run; pairwise transfer trains every single task and every pair; the
transferability scores read the single-task models' frozen features.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from polytask.config import Config
from polytask.engine import checkpoint
from polytask.engine.progress import Reporter
from polytask.engine.spec import CHECKPOINT, TIMING
from polytask.errors import ConfigError
from polytask.experiment import execute, job_dir_of, open_run, releases_run_locks, run_suite, single_task_job
from polytask.flows.jobs import Job
from polytask.io import atomic_write_bytes
from polytask.registry import suggest
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


@dataclass(frozen=True)
class NetworkSpec:
    """How to train a network of the grouping: its tasks, cost, name, and model-section overrides."""

    tasks: tuple[str, ...]
    cost: float
    label: str = ""
    model: dict[str, Any] = field(default_factory=dict)


def listed_networks(config: Config, suite: TaskSuite) -> list[NetworkSpec]:
    """``group.networks`` and ``group.single_task_networks`` as specs, checked against the suite's tasks and the
    model section (before anything trains)."""
    gc = config.group
    names = suite.task_names
    out = []
    for i, net in enumerate(gc.networks):
        unknown = [t for t in net.tasks if t not in names]
        if unknown:
            raise ConfigError(f"group.networks.{i}.tasks: unknown task {unknown[0]!r}{suggest(unknown[0], names)}")
        if len(set(net.tasks)) != len(net.tasks):
            raise ConfigError(f"group.networks.{i}.tasks: a task is listed twice in {net.tasks}")
        if net.losses is not None and set(net.losses) != set(net.tasks):
            raise ConfigError(f"group.networks.{i}.losses: give one loss per task of the network {net.tasks}, "
                              f"got {sorted(net.losses)}")
        out.append(NetworkSpec(tuple(net.tasks), net.cost, net.label or f"custom-{i}", dict(net.model)))
    if gc.single_task_networks is not None:
        st = gc.single_task_networks
        out += [NetworkSpec((t,), st.cost, st.label, dict(st.model)) for t in names]
    keys = [(n.label, n.tasks) for n in out]
    for n in out:
        network_config(config, n)  # a bad model override fails here, naming the network
        if keys.count((n.label, n.tasks)) > 1:
            raise ConfigError(f"group.networks: two networks for {list(n.tasks)} are labelled {n.label!r}; "
                              "give each its own label")
    return out


def network_config(config: Config, net: NetworkSpec) -> Config:
    """``config`` with the network's model overrides applied (deep-merged into the model section)."""
    if not net.model:
        return config

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    try:
        return Config.model_validate({**config.model_dump(), "model": merge(config.model.model_dump(), net.model)})
    except ValidationError as e:
        raise ConfigError(f"group network {net.label!r}: its model overrides are not a valid model section: "
                          f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None


def network_job(net: NetworkSpec, config: Config, prefix: str = "group") -> tuple[Job, Config]:
    """The job and config of one network: a plain group job, or, with model overrides, a job of its own."""
    if not net.model:
        return group_job(net.tasks, config, prefix), config
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", net.label) or "net"
    return Job(f"{prefix}-{slug}/{'+'.join(net.tasks)}", net.tasks, config.relate.method, "joint"), \
        network_config(config, net)


def _measured(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
              net: NetworkSpec, given: dict[str, float] | None) -> dict[str, float]:
    """A listed network's validation loss per task: as given, or measured by training it (seed ``config.seed``)."""
    if given is not None:
        return dict(given)
    job, cfg = network_job(net, config, "net")
    result = execute(job, suite, cfg, run_dir, reporter)
    return {t: float(result["val"][t]["loss"]) for t in net.tasks}


def choose_groups(config: Config, aff: AffinityMatrix, run_dir: Path, suite: TaskSuite | None = None,
                  reporter: Reporter | None = None) -> Any:
    """Solve the grouping problem for ``config.group`` on ``aff``: TAG's score (Standley's HOA for pairwise)
    with exact or beam selection, over the affinity's networks (each ``network_cost``) and the listed networks
    with their own costs; for data maps, STG-MTL clustering of the tasks' data-map features."""
    from polytask.relations.clustering import cluster_tasks
    from polytask.relations.grouping import Candidate, Candidates, HoaScore, TagScore, select_beam, select_exact

    gc = config.group
    n_models = math.floor(gc.budget / gc.network_cost + 1e-9)
    if aff.estimator == "datamap":
        feats = load_file(run_dir / "datamap.safetensors")["features"].double()
        feats = torch.where(torch.isnan(feats), torch.nanmean(feats, dim=0, keepdim=True), feats)
        return cluster_tasks(feats.numpy(), aff.tasks, n_models, seed=config.seed)
    pairwise = aff.estimator == "pairwise"
    score = HoaScore(pair_losses(aff)) if pairwise else TagScore(aff, gc.singleton_score)
    listed = listed_networks(config, suite) if suite is not None else []
    if not listed:
        exact = gc.solver == "exact" or (gc.solver == "auto" and len(aff.tasks) <= 16)
        solve = select_exact if exact else select_beam
        return solve(score, aff.tasks, gc.budget, max_group_size=gc.max_group_size, network_cost=gc.network_cost)
    reporter = reporter or Reporter(quiet=True)
    estimated = Candidates.from_score(score, aff.tasks, gc.network_cost, gc.max_group_size)
    extra = []
    for i, net in enumerate(listed):
        given = gc.networks[i].losses if i < len(gc.networks) else None
        if pairwise:  # HOA values are (negated) losses: measured losses join them
            extra.append(Candidate(net.tasks, net.cost, _measured(config, suite, run_dir, reporter, net, given),
                                   net.label))
        elif given is not None:
            raise ConfigError(f"group.networks.{i}.losses: measured losses mix only with the pairwise estimator "
                              f"(HOA values are losses); {aff.estimator} gives affinity scores. Drop the losses "
                              "to value the network by the score, or set group.estimator: pairwise")
        else:
            idx = tuple(aff.index(t) for t in net.tasks)
            extra.append(Candidate(net.tasks, net.cost, {t: score(aff.index(t), tuple(sorted(idx)))
                                                         for t in net.tasks}, net.label))
    cands = estimated.extended(extra, higher_is_better=not pairwise)
    exact = gc.solver == "exact" or (gc.solver == "auto" and len(aff.tasks) <= 14)
    solve = select_exact if exact else select_beam
    return solve(cands, aff.tasks, gc.budget, max_group_size=gc.max_group_size)


def random_partition(tasks: list[str], n_groups: int, seed: int) -> list[list[str]]:
    """A uniformly shuffled split of ``tasks`` into ``n_groups`` non-empty groups (seeded)."""
    rng = np.random.default_rng(seed)
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    n = min(n_groups, len(tasks))
    cuts = sorted(rng.choice(np.arange(1, len(tasks)), size=n - 1, replace=False)) if n > 1 else []
    bounds = [0, *cuts, len(tasks)]
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class Strategy:
    """A way to serve the tasks: its networks, which one serves each task, or (STG-MTL's soft form) all-task
    models with per-model loss weights served by their membership-weighted ensemble."""

    networks: list[NetworkSpec]
    serve: dict[str, int] | None = None
    membership: np.ndarray | None = None

    @property
    def groups(self) -> list[list[str]]:
        return [list(n.tasks) for n in self.networks]


def _strategies(config: Config, suite: TaskSuite, chosen: Any) -> dict[str, Strategy]:
    from polytask.relations.clustering import TaskClusters

    tasks = suite.task_names
    gc = config.group
    specs = {(n.label, n.tasks): n for n in listed_networks(config, suite)}
    if isinstance(chosen, TaskClusters) and gc.stg_form == "soft":
        picked = Strategy([NetworkSpec(tuple(tasks), gc.network_cost, f"cluster-{c}")
                           for c in range(chosen.membership.shape[1])], membership=chosen.membership)
    else:
        grouping = chosen.to_grouping() if isinstance(chosen, TaskClusters) else chosen
        used = [i for i, g in enumerate(grouping.groups) if g]  # a cluster may end up with no task
        nets = [specs.get((grouping.labels[i], tuple(grouping.groups[i])),
                          NetworkSpec(tuple(grouping.groups[i]), grouping.costs[i], grouping.labels[i])) for i in used]
        picked = Strategy(nets, {t: used.index(i) for t, i in grouping.assignment.items()})
    n_models = math.floor(gc.budget / gc.network_cost + 1e-9)
    out = {"chosen": picked,
           "all-in-one": Strategy([NetworkSpec(tuple(tasks), gc.network_cost)]),
           "independent": Strategy([NetworkSpec((t,), gc.network_cost) for t in tasks])}
    for r in range(gc.random_groupings):
        parts = random_partition(tasks, n_models, config.seed * 7919 + r)
        out[f"random-{r}"] = Strategy([NetworkSpec(tuple(g), gc.network_cost) for g in parts])
    return out


def _ensemble_scores(config: Config, suite: TaskSuite, run_dir: Path, jobs: list[tuple[Job, Config]],
                     membership: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Validation and test scores of STG-MTL's membership-weighted ensemble of the trained cluster models."""
    from polytask.engine.loop import evaluate
    from polytask.models import build_model
    from polytask.relations.stg import MembershipEnsemble

    models = []
    for job, cfg in jobs:
        model = build_model(list(suite.tasks), suite.input_shape, cfg.model.backbone, cfg.model.backbone_params,
                            cfg.model.architecture, cfg.model.architecture_params)
        model.load_state_dict(load_file(job_dir_of(run_dir, job) / "best.safetensors"))
        models.append(model)
    ens = MembershipEnsemble(models, membership, list(suite.tasks))
    return {split: evaluate(ens, suite.splits[split], list(suite.tasks), config.train.eval_batch_size)
            for split in ("val", "test")}


def _run_strategy(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter, st: Strategy,
                  seed: int) -> dict[str, dict[str, float]]:
    """Train a strategy's networks at ``seed``; per task: validation loss and test metrics of what serves it."""
    from polytask.config import MethodConfig
    from polytask.relations.stg import cluster_weights

    tasks = suite.task_names
    cfg = config.model_copy(update={"seed": seed})
    if st.membership is not None:
        jobs = []
        for c, weights in enumerate(cluster_weights(st.membership, tasks)):
            job = Job(f"s{seed}/stg-soft/cluster-{c}", tuple(tasks), MethodConfig(name="static",
                                                                                 params={"weights": weights}), "joint")
            execute(job, suite, cfg, run_dir, reporter, split_seed=config.seed)
            jobs.append((job, cfg))
        scores = _ensemble_scores(cfg, suite, run_dir, jobs, st.membership)
        return {t: {"val_loss": scores["val"][t]["loss"], **scores["test"][t]} for t in tasks}
    results = []
    for net in st.networks:
        job, ncfg = network_job(net, cfg)
        # the suite's split was drawn with the run's seed; only the training seed is ``seed``
        results.append(execute(_seeded(job, seed), suite, ncfg, run_dir, reporter, split_seed=config.seed))
    serve = st.serve if st.serve is not None else {t: next(i for i, g in enumerate(st.groups) if t in g)
                                                   for t in tasks}
    return {t: {"val_loss": results[serve[t]]["val"][t]["loss"], **results[serve[t]]["test"][t]} for t in tasks}


def compare_groupings(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                      chosen: Any) -> dict[str, Any]:
    """Train the chosen networks and, under the same budget, all-in-one, independent and random groupings,
    over ``config.group.seeds``; every task is scored by the network that serves it (STG-MTL's soft form: by the
    membership-weighted ensemble of the cluster models)."""
    tasks = suite.task_names
    out: dict[str, Any] = {"strategies": {}, "tasks": tasks}
    for name, st in _strategies(config, suite, chosen).items():
        per_seed = []
        for s in config.group.seeds:
            per_task = _run_strategy(config, suite, run_dir, reporter, st, s)
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


@releases_run_locks
def group(config: Config | None = None, resume: str | None = None,
          reporter: Reporter | None = None) -> tuple[Path, dict[str, Any]]:
    """Estimate affinity, choose networks within the budget, prove them by training; write groups.json."""
    from polytask.io import atomic_write_json
    from polytask.relations.clustering import TaskClusters

    reporter = reporter or Reporter()
    run_dir, config, _ = open_run(config, resume)
    suite = run_suite(config, run_dir)
    listed_networks(config, suite)  # check the listed networks before anything trains
    aff = estimate(config, suite, run_dir, reporter, [config.group.estimator])[config.group.estimator]
    chosen = choose_groups(config, aff, run_dir, suite, reporter)
    comparison = compare_groupings(config, suite, run_dir, reporter, chosen)
    grouping = chosen.to_grouping() if isinstance(chosen, TaskClusters) else chosen
    summary = {"estimator": aff.estimator, "affinity_cost": aff.cost, "budget": config.group.budget,
               "grouping": grouping.to_json(), "planted_groups": suite.info.get("planted_groups"), **comparison}
    if isinstance(chosen, TaskClusters):
        summary["stg_form"] = config.group.stg_form
    atomic_write_json(run_dir / "groups.json", summary)
    _write_relations_report(run_dir)
    return run_dir, summary
