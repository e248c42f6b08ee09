"""The pure pieces of the relate and group flows (:mod:`polytask.flows.relate`, :mod:`polytask.flows.group`):
the networks a grouping may use, the grouping problem's solution on an affinity matrix, the strategies the
group flow compares, the data-map correlation. Nothing here trains or writes a run directory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from polytask.config import Config
from polytask.errors import ConfigError
from polytask.registry import suggest
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.clustering import TaskClusters
from polytask.tasks.task import TaskSuite


def nan_corr(features: torch.Tensor) -> torch.Tensor:
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

def choose_groups(config: Config, aff: AffinityMatrix, run_dir: Path, suite: TaskSuite | None = None,
                  measure: Callable[[NetworkSpec], dict[str, float]] | None = None) -> Any:
    """Solve the grouping problem for ``config.group`` on ``aff``: TAG's score (Standley's HOA for pairwise)
    with exact or beam selection, over the affinity's networks (each ``network_cost``) and the listed networks
    with their own costs; for data maps, STG-MTL clustering of the tasks' data-map features (read from
    ``run_dir/datamap.safetensors``). With the pairwise estimator a listed network without given losses is
    valued by ``measure`` (its validation loss per task; the group flow trains it)."""
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
    estimated = Candidates.from_score(score, aff.tasks, gc.network_cost, gc.max_group_size)
    extra = []
    for i, net in enumerate(listed):
        given = gc.networks[i].losses if i < len(gc.networks) else None
        if pairwise:  # HOA values are (negated) losses: measured losses join them
            if given is None and measure is None:
                raise ConfigError(f"group.networks.{i}: no losses given and nothing to measure them with "
                                  "(the group flow trains the network)")
            extra.append(Candidate(net.tasks, net.cost, dict(given) if given is not None else measure(net),
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

def strategies(config: Config, suite: TaskSuite, chosen: Any) -> dict[str, Strategy]:
    """The ways to serve the tasks that the group flow trains and compares: the chosen networks (STG-MTL's soft
    form: all-task cluster models), all-in-one, independent models and ``group.random_groupings`` random groupings
    of the budget's number of networks."""
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
