"""Task grouping under a budget: which multi-task networks to train so every task is served well.

The problem (Standley et al. 2020, "Which Tasks Should Be Learned Together in Multi-task Learning?", Sec. 3.3
network selection; Fifty et al. 2021, "Efficiently Identifying Task Groupings for Multi-Task Learning" (TAG),
Sec. 3.3): choose networks whose costs add up to at most the budget and that together contain every task; each
task is served by the chosen network that is best FOR IT; maximise the sum over tasks of that best value.

Two ways to state the candidates:

* a per-task group score ``score(j, G)`` (task index ``j`` in group ``G``, a sorted tuple of task indices; higher
  is better): every group of up to ``max_group_size`` tasks is a candidate, each network costs the same (1 by
  default), so a budget b allows floor(b) networks. :class:`TagScore` and :class:`HoaScore` build the score from
  an :class:`AffinityMatrix`; any callable works.
* a list of :class:`Candidate` networks in :class:`Candidates` (Standley et al.'s setting): each has a task set,
  its own cost and its measured or estimated per-task values; a task set may appear several times (a half-size
  single-task network at cost 0.5 beside a full-size one at cost 1), and the budget is any real number.

:func:`select_exact` returns the provable optimum (K <= 16 for scores, K <= 14 for candidate lists);
:func:`select_beam` is the heuristic for larger K. Ties are broken explicitly: among networks that give the
tasks they serve equal values (within rounding), the solvers train the smaller one (lower cost, then fewer
tasks), and among count-of-networks choices of equal value the exact candidate solver takes the cheaper one.
Standley et al.'s official search keeps whichever tied selection it meets last; the HOA notebook of TAG keeps
the first; neither says so.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from polytask.errors import ConfigError, DataError
from polytask.registry import NoParams, Registry
from polytask.relations.affinity import AffinityMatrix, _jsonable

ScoreFn = Callable[[int, tuple[int, ...]], float]

#: What TAG's official network-selection notebook gives a task that sits alone in a group: -1e6, i.e. a singleton
#: is only ever chosen when nothing else can cover the task (google-research/tag, TAG_network_selection.ipynb).
TAG_SINGLETON_SCORE = -1e6

EXACT_MAX_TASKS = 16


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------
@runtime_checkable
class TableScore(Protocol):
    """A group score that can also fill a whole table at once (fast path for the solvers)."""

    tasks: list[str]

    def __call__(self, j: int, group: tuple[int, ...]) -> float: ...

    def table(self, masks: np.ndarray) -> np.ndarray:
        """(n, K) scores for n groups given as bit masks; -inf where the task is not in the group."""
        ...


def members(masks: np.ndarray, k: int) -> np.ndarray:
    """(n, K) boolean membership of n groups given as int64 bit masks (bit i = task i)."""
    masks = np.asarray(masks, dtype=np.int64)
    return ((masks[:, None] >> np.arange(k, dtype=np.int64)[None, :]) & 1).astype(bool)


def to_mask(group: Iterable[int]) -> int:
    m = 0
    for i in group:
        m |= 1 << int(i)
    return m


def from_mask(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(int(mask).bit_length()) if mask >> i & 1)


@dataclass
class TagScore:
    """TAG's per-task group score (Fifty et al. 2021, Sec. 3.3): the mean affinity ONTO task j from its group mates,

    ``score(j, G) = mean_{i in G, i != j} Z[i, j]`` with ``Z[i, j]`` the effect of task i on task j (the
    :class:`AffinityMatrix` convention; the diagonal is never used). A singleton has no mates: it scores
    ``singleton_score``, by default TAG's official -1e6 ("never alone unless forced"); 0.0 reads as "no transfer,
    neither help nor harm". Lower-is-better matrices are negated first.
    """

    affinity: AffinityMatrix
    singleton_score: float = TAG_SINGLETON_SCORE
    name: str = "tag"

    def __post_init__(self) -> None:
        self.tasks = list(self.affinity.tasks)
        z = self.affinity.oriented()
        np.fill_diagonal(z, 0.0)
        self._z = z
        if not math.isfinite(self.singleton_score):
            raise ConfigError(f"tag score: singleton_score must be finite, got {self.singleton_score}")

    def __call__(self, j: int, group: tuple[int, ...]) -> float:
        mates = [i for i in group if i != j]
        if not mates:
            return float(self.singleton_score)
        return float(np.mean(self._z[mates, j]))

    def table(self, masks: np.ndarray) -> np.ndarray:
        """(n, K) TAG scores of n groups given as bit masks, all at once; -inf where the task is not in the group."""
        b = members(masks, len(self.tasks))
        count = b.sum(1, keepdims=True).astype(np.float64)
        sums = b.astype(np.float64) @ self._z
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(count > 1, sums / np.maximum(count - 1, 1), self.singleton_score)
        return np.where(b, out, -np.inf)


@dataclass
class HoaScore:
    """Standley et al. 2020's higher-order approximation (HOA, Sec. 3.3) from pairwise networks.

    ``pairs[i, j]`` is task j's loss (or any metric; see ``higher_is_better``) when trained together with task i,
    i.e. ``L_j({i, j})``; the diagonal ``[j, j]`` is j's single-task value ``L_j({j})``. The predicted value of j in
    a group G is ``HOA_j(G) = mean_{i in G \\ {j}} L_j({i, j})``; a singleton is ``L_j({j})``. Lower-is-better
    values are negated so the solvers maximise. ``measured`` overrides the approximation with values of networks
    that were actually trained (e.g. the all-task network): ``{frozenset(task names): {task: value}}``.
    """

    pairs: AffinityMatrix
    measured: Mapping[frozenset[str], Mapping[str, float]] | None = None
    name: str = "hoa"

    def __post_init__(self) -> None:
        self.tasks = list(self.pairs.tasks)
        v = self.pairs.oriented()
        if not np.isfinite(np.diag(v)).all():
            bad = [self.tasks[i] for i in np.flatnonzero(~np.isfinite(np.diag(v)))]
            raise DataError(f"hoa score: needs each task's single-task value on the diagonal; missing for {bad}")
        self._v = v
        self._measured: dict[int, np.ndarray] = {}
        sign = 1.0 if self.pairs.higher_is_better else -1.0
        for group, values in (self.measured or {}).items():
            idx = [self.pairs.index(t) for t in group]
            row = np.full(len(self.tasks), np.nan)
            for t, val in values.items():
                if t not in group:
                    raise DataError(f"hoa score: measured value for {t!r} given for a group without it: {set(group)}")
                row[self.pairs.index(t)] = sign * float(val)
            self._measured[to_mask(idx)] = row

    def __call__(self, j: int, group: tuple[int, ...]) -> float:
        row = self._measured.get(to_mask(group))
        if row is not None and not math.isnan(row[j]):
            return float(row[j])
        mates = [i for i in group if i != j]
        if not mates:
            return float(self._v[j, j])
        return float(np.mean(self._v[mates, j]))

    def table(self, masks: np.ndarray) -> np.ndarray:
        """(n, K) HOA values of n groups given as bit masks (measured networks override); -inf where the task is
        not in the group."""
        masks = np.asarray(masks, dtype=np.int64)
        k = len(self.tasks)
        b = members(masks, k)
        off = self._v.copy()
        np.fill_diagonal(off, 0.0)
        count = b.sum(1, keepdims=True).astype(np.float64)
        sums = b.astype(np.float64) @ off
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(count > 1, sums / np.maximum(count - 1, 1), np.diag(self._v)[None, :])
        if self._measured:
            for r in np.flatnonzero(np.isin(masks, np.fromiter(self._measured, dtype=np.int64))):
                row = self._measured[int(masks[r])]
                out[r] = np.where(np.isnan(row), out[r], row)
        return np.where(b, out, -np.inf)


@dataclass
class FunctionScore:
    """Wrap any ``score(j, group) -> float`` callable so the solvers can fill tables with it (one call per entry)."""

    fn: ScoreFn
    tasks: list[str]

    def __call__(self, j: int, group: tuple[int, ...]) -> float:
        return float(self.fn(j, group))

    def table(self, masks: np.ndarray) -> np.ndarray:
        """(n, K) scores of n groups given as bit masks, one call of the wrapped function per entry; -inf where the
        task is not in the group."""
        k = len(self.tasks)
        out = np.full((len(masks), k), -np.inf)
        for r, mask in enumerate(np.asarray(masks, dtype=np.int64)):
            g = from_mask(int(mask))
            for j in g:
                out[r, j] = self.fn(j, g)
        return out


def _as_table_score(score: ScoreFn | TableScore, tasks: Sequence[str]) -> TableScore:
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise DataError(f"grouping: task names must be unique, got {tasks}")
    if isinstance(score, TableScore):
        if list(score.tasks) != tasks:
            raise DataError(f"grouping: the score is over tasks {list(score.tasks)}, the solver was given {tasks}")
        return score
    if not callable(score):
        raise ConfigError(f"grouping: score must be callable score(j, group) -> float, got {type(score).__name__}")
    return FunctionScore(score, tasks)


def _checked_table(score: TableScore, masks: np.ndarray) -> np.ndarray:
    t = np.asarray(score.table(masks), dtype=np.float64)
    if t.shape != (len(masks), len(score.tasks)):
        raise DataError(f"grouping: score table has shape {t.shape}, expected {(len(masks), len(score.tasks))}")
    bad = np.argwhere(np.isnan(t) | (t == np.inf))
    if len(bad):
        r, j = bad[0]
        g = [score.tasks[i] for i in from_mask(int(masks[r]))]
        raise DataError(f"grouping: score of task {score.tasks[j]!r} in group {g} is {t[r, j]} (must be a number)")
    return t


# --------------------------------------------------------------------------------------------------------------
# Candidate networks with their own costs
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One network that may be trained: the tasks it serves, its cost, and each of its tasks' value in it (a
    measured or estimated loss when its :class:`Candidates` say lower is better). ``label`` names it in results,
    e.g. "half-size"."""

    tasks: tuple[str, ...]
    cost: float
    values: Mapping[str, float]
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        object.__setattr__(self, "values", {str(k): float(v) for k, v in dict(self.values).items()})

    def describe(self) -> str:
        """A short name for messages: ``network a+b (label)``."""
        return f"network {'+'.join(self.tasks) or '(no tasks)'}" + (f" ({self.label})" if self.label else "")


@dataclass
class Candidates:
    """Candidate networks for the solvers (Standley et al. 2020's setting): any number per task set, each with its
    own cost and per-task values, all in one unit (``higher_is_better`` says which way)."""

    networks: list[Candidate]
    tasks: list[str]
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        self.networks = list(self.networks)
        self.tasks = [str(t) for t in self.tasks]
        if len(set(self.tasks)) != len(self.tasks):
            raise DataError(f"candidates: task names must be unique, got {self.tasks}")
        if not self.networks:
            raise DataError("candidates: the list of candidate networks is empty")
        idx = {t: i for i, t in enumerate(self.tasks)}
        k = len(self.tasks)
        self.rows = np.full((len(self.networks), k), -np.inf)
        self.masks = np.zeros(len(self.networks), dtype=np.int64)
        self.costs = np.zeros(len(self.networks))
        sign = 1.0 if self.higher_is_better else -1.0
        for r, net in enumerate(self.networks):
            if not net.tasks or len(set(net.tasks)) != len(net.tasks):
                raise DataError(f"candidates: {net.describe()} needs one or more distinct tasks")
            unknown = [t for t in net.tasks if t not in idx]
            if unknown:
                raise DataError(f"candidates: {net.describe()} names unknown task(s) {unknown}; known: {self.tasks}")
            if not (math.isfinite(net.cost) and net.cost > 0):
                raise DataError(f"candidates: {net.describe()} has cost {net.cost}; costs must be finite and > 0")
            missing = [t for t in net.tasks if t not in net.values]
            extra = [t for t in net.values if t not in net.tasks]
            if missing or extra:
                raise DataError(f"candidates: {net.describe()} needs one value per task it serves "
                                f"(missing {missing}, not in the network {extra})")
            bad = [t for t in net.tasks if not math.isfinite(net.values[t])]
            if bad:
                raise DataError(f"candidates: {net.describe()} has a non-finite value for {bad}")
            for t in net.tasks:
                self.rows[r, idx[t]] = sign * net.values[t]
            self.masks[r] = to_mask(idx[t] for t in net.tasks)
            self.costs[r] = float(net.cost)

    @classmethod
    def from_score(cls, score: ScoreFn | TableScore, tasks: Sequence[str], cost: float = 1.0,
                   max_group_size: int | None = None, label: str = "") -> Candidates:
        """Every group of up to ``max_group_size`` tasks as a network of cost ``cost``, valued by ``score``."""
        sc = _as_table_score(score, tasks)
        k = len(sc.tasks)
        masks = _all_masks(k, min(k, max_group_size or k))
        table = _checked_table(sc, masks)
        nets = [Candidate(tuple(sc.tasks[i] for i in from_mask(int(mk))), cost,
                          {sc.tasks[i]: float(table[r, i]) for i in from_mask(int(mk))}, label)
                for r, mk in enumerate(masks)]
        return cls(nets, list(sc.tasks), higher_is_better=True)

    def extended(self, networks: Iterable[Candidate], higher_is_better: bool | None = None) -> Candidates:
        """These candidates plus ``networks`` (given in the other unit when ``higher_is_better`` differs: their
        values are negated into this one's)."""
        flip = higher_is_better is not None and higher_is_better != self.higher_is_better
        extra = [Candidate(n.tasks, n.cost, {t: -v for t, v in n.values.items()} if flip else n.values, n.label)
                 for n in networks]
        return Candidates([*self.networks, *extra], list(self.tasks), self.higher_is_better)


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Grouping:
    """Chosen networks (their task groups, costs and labels), which one serves each task (index into ``groups``),
    and the values: in score units (higher is better) for a score, in the candidates' own units for
    :class:`Candidates` (``meta["higher_is_better"]`` says which)."""

    groups: list[list[str]]
    assignment: dict[str, int]
    total: float
    per_task: dict[str, float]
    solver: str
    nodes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    costs: list[float] = field(default_factory=list)  # default: 1 per network
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.costs = [float(c) for c in self.costs] or [1.0] * len(self.groups)
        self.labels = [str(x) for x in self.labels] or [""] * len(self.groups)
        if not len(self.costs) == len(self.labels) == len(self.groups):
            raise DataError(f"grouping: {len(self.groups)} groups, {len(self.costs)} costs, {len(self.labels)} labels")

    @property
    def total_cost(self) -> float:
        """The budget the chosen networks use (sum of their costs)."""
        return float(sum(self.costs))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the grouping (strict JSON: -inf values become ``null``)."""
        return {
            "groups": [list(g) for g in self.groups],
            "costs": list(self.costs),
            "labels": list(self.labels),
            "total_cost": self.total_cost,
            "assignment": dict(self.assignment),
            "total": _jsonable(float(self.total)),
            "per_task": _jsonable({k: float(v) for k, v in self.per_task.items()}),
            "solver": self.solver,
            "nodes": int(self.nodes),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grouping:
        """Inverse of :meth:`to_json` (``null`` values read back as -inf)."""
        return cls(
            groups=[list(g) for g in data["groups"]],
            assignment={k: int(v) for k, v in data["assignment"].items()},
            total=float(data["total"]) if data["total"] is not None else -math.inf,
            per_task={k: (float(v) if v is not None else -math.inf) for k, v in data["per_task"].items()},
            solver=str(data["solver"]),
            nodes=int(data.get("nodes", 0)),
            meta=dict(data.get("meta", {})),
            costs=[float(c) for c in data.get("costs", [])],
            labels=[str(x) for x in data.get("labels", [])],
        )


def evaluate_groups(score: ScoreFn | TableScore, tasks: Sequence[str], groups: Sequence[Iterable[str]]) -> Grouping:
    """Score given groups: each task is served by the group best for it (ties: the earlier group). Groups are
    listed in a canonical order (by their sorted task indices), all kept."""
    sc = _as_table_score(score, tasks)
    idx = {t: i for i, t in enumerate(tasks)}
    glist = [sorted({idx[t] for t in g}) for g in groups]
    masks = np.array([to_mask(g) for g in glist], dtype=np.int64)
    return _result(sc, masks, "given", 0, {}, drop_idle=False)


def _result(
    sc: TableScore, masks: np.ndarray, solver: str, nodes: int, meta: dict[str, Any], drop_idle: bool = True,
    unit_cost: float = 1.0,
) -> Grouping:
    """The grouping of score-valued networks ``masks`` (each of cost ``unit_cost``), listed canonically."""
    uniq = sorted({int(m) for m in masks}, key=lambda m: (from_mask(m), m))
    masks = np.array(uniq, dtype=np.int64)
    rows = _checked_table(sc, masks) if len(masks) else np.full((0, len(sc.tasks)), -np.inf)
    return _assemble(list(sc.tasks), rows, masks, np.full(len(masks), float(unit_cost)), [""] * len(masks),
                     solver, nodes, meta, drop_idle)


def _assemble(
    tasks: list[str], rows: np.ndarray, masks: np.ndarray, costs: np.ndarray, labels: list[str], solver: str,
    nodes: int, meta: dict[str, Any], drop_idle: bool = True, sign: float = 1.0,
) -> Grouping:
    """Serve each task by the network best for it (ties within rounding: the cheaper, then the smaller, then the
    earlier network); drop networks that serve no task when ``drop_idle``. ``sign`` turns the (higher-is-better)
    rows back into the caller's units for the reported values."""
    k = len(tasks)
    fin = np.isfinite(rows)
    uncovered = [tasks[j] for j in range(k) if not fin[:, j].any()]
    if uncovered:
        raise DataError(f"grouping: tasks {uncovered} are in no chosen group (or have no finite score in one)")
    tol = 1e-12 * max(1.0, float(np.abs(rows[fin]).max()) if fin.any() else 1.0)
    best = np.zeros(k, dtype=np.int64)
    for j in range(k):
        col = rows[:, j]
        ok = np.flatnonzero(col >= col.max() - tol)
        best[j] = ok[np.lexsort((ok, np.bitwise_count(masks[ok]), costs[ok]))[0]]
    vals = rows[best, np.arange(k)]
    keep = np.arange(len(masks))
    if drop_idle:  # a network that is best for no task adds nothing: do not train it
        keep = np.array(sorted(set(best.tolist())), dtype=np.int64)
        best = np.searchsorted(keep, best)
    return Grouping(
        groups=[[tasks[i] for i in from_mask(int(masks[r]))] for r in keep],
        assignment={tasks[j]: int(best[j]) for j in range(k)},
        total=float(sign * vals.sum()),
        per_task={tasks[j]: float(sign * vals[j]) for j in range(k)},
        solver=solver,
        nodes=int(nodes),
        meta=meta,
        costs=[float(costs[r]) for r in keep],
        labels=[labels[r] for r in keep],
    )


def _check_budget(k: int, budget: float, max_group_size: int | None, unit_cost: float = 1.0) -> tuple[int, int]:
    """(largest group size, number of networks of cost ``unit_cost`` the budget allows)."""
    if k < 1:
        raise DataError("grouping: needs at least one task")
    b = _check_real_budget(budget)
    count = math.floor(b / unit_cost + 1e-9)
    if count < 1:
        raise ConfigError(f"grouping: budget {budget!r} buys no network (each costs {unit_cost:g}); "
                          "the budget must be >= 1 network")
    m = k if max_group_size is None else int(max_group_size)
    if m < 1:
        raise ConfigError(f"grouping: max_group_size must be >= 1, got {max_group_size!r}")
    m = min(m, k)
    if count * m < k:
        raise ConfigError(f"grouping: {count} group(s) of at most {m} tasks cannot cover {k} tasks")
    return m, count


def _check_real_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ConfigError(f"grouping: budget must be a number > 0, got {budget!r}")
    b = float(budget)
    if not (math.isfinite(b) and b > 0):
        raise ConfigError(f"grouping: budget must be a number > 0, got {budget!r}")
    return b


# --------------------------------------------------------------------------------------------------------------
# Exact: branch and bound
# --------------------------------------------------------------------------------------------------------------
def _all_masks(k: int, m: int) -> np.ndarray:
    masks = np.arange(1, 1 << k, dtype=np.int64)
    return masks[np.bitwise_count(masks) <= m]


def dominated(table: np.ndarray, masks: np.ndarray, k: int) -> np.ndarray:
    """Which candidate groups are dominated by a candidate with one more task that is at least as good for
    every member and better for one (dropping them never changes the optimum: swap G for G + {t} in any
    solution). A group that ties its superset for every member is kept: on equal values the smaller network wins.

    ``table`` is indexed by mask (row m = group m; -inf rows are not candidates)."""
    out = np.zeros(len(masks), dtype=bool)
    mem = members(masks, k)
    for t in range(k):
        sel = ~mem[:, t]
        g = masks[sel]
        h = g | (1 << t)
        h_ok = np.isfinite(table[h]).any(1)
        ge = np.where(mem[sel], table[h] >= table[g], True).all(1)
        gt = np.where(mem[sel], table[h] > table[g], False).any(1)
        out[np.flatnonzero(sel)[h_ok & ge & gt]] = True
    return out


def _superset_max(table: np.ndarray, k: int) -> np.ndarray:
    """U[P, i] = max over candidate groups G containing P of table[G, i] (sum-over-supersets with max)."""
    u = table.copy()
    for b in range(k):
        v = u.reshape(-1, 2, 1 << b, u.shape[1])
        np.maximum(v[:, 0], v[:, 1], out=v[:, 0])
    return u


def served_values(table: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """w[S] = max over candidate groups G containing S of sum_{i in S} table[G, i], for every task set S
    (``table`` indexed by mask)."""
    return served_values_rows(table[candidates], candidates, k)


def served_values_rows(rows: np.ndarray, masks: np.ndarray, k: int) -> np.ndarray:
    """w[S] = max over networks r whose task set ``masks[r]`` contains S of sum_{i in S} rows[r, i].

    Each network contributes the 2^|G| subset sums of its row, built by doubling and scattered with a max
    (sum over networks of 2^|G| <= 3^K work: 43M adds at K = 16)."""
    w = np.full(1 << k, -np.inf)
    masks = np.asarray(masks, dtype=np.int64)
    sizes = np.bitwise_count(masks)
    for g in range(1, k + 1):
        sel = np.flatnonzero(sizes == g)
        if not len(sel):
            continue
        idx = np.nonzero(members(masks[sel], k))[1].reshape(len(sel), g)
        vals = rows[sel[:, None], idx]
        chunk = max(1, (1 << 22) >> g)
        for s in range(0, len(sel), chunk):
            v, bits = vals[s : s + chunk], np.int64(1) << idx[s : s + chunk].astype(np.int64)
            sums = np.zeros((len(v), 1 << g))
            sub = np.zeros((len(v), 1 << g), dtype=np.int64)
            for b in range(g):
                h = 1 << b
                np.add(sums[:, :h], v[:, b : b + 1], out=sums[:, h : 2 * h])
                np.bitwise_or(sub[:, :h], bits[:, b : b + 1], out=sub[:, h : 2 * h])
            np.maximum.at(w, sub.reshape(-1), sums.reshape(-1))
    w[0] = -np.inf  # the empty set is no part
    return w


def _smallest_attaining(rows: np.ndarray, masks: np.ndarray, costs: np.ndarray, part: int, tol: float) -> int:
    """Index (into ``rows``) of the network that gives the tasks of ``part`` the largest sum, preferring on ties
    (within ``tol``) the lower cost, then fewer tasks, then the lower mask, then the earlier row. Every network
    must contain ``part``."""
    bits = [i for i in range(rows.shape[1]) if part >> i & 1]
    sums = rows[:, bits].sum(1)
    ok = np.flatnonzero(sums >= sums.max() - tol)
    order = np.lexsort((ok, masks[ok], np.bitwise_count(masks[ok]), costs[ok]))
    return int(ok[order[0]])


@functools.lru_cache(maxsize=4)
def subset_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """All (U, A) with A a subset of U, over n bits: 3^n pairs (cached; read-only arrays)."""
    uu = np.zeros(1, dtype=np.int64)
    aa = np.zeros(1, dtype=np.int64)
    for b in range(n):
        bit = np.int64(1 << b)
        uu = np.concatenate([uu, uu | bit, uu | bit])
        aa = np.concatenate([aa, aa, aa | bit])
    uu.flags.writeable = False
    aa.flags.writeable = False
    return uu, aa


def maxplus_conv(f: np.ndarray, g: np.ndarray, n: int) -> np.ndarray:
    """(f * g)(U) = max over A subset of U of f(U minus A) + g(A): the max-plus subset convolution, 3^n work."""
    uu, aa = subset_pairs(n)
    out = np.full(1 << n, -np.inf)
    np.maximum.at(out, uu, f[uu ^ aa] + g[aa])
    return out


def maxplus_split(f: np.ndarray, g: np.ndarray, n: int, u: int, tol: float = 0.0) -> int:
    """An A attaining (f * g)(u); with ``tol`` > 0, the one with the fewest bits among those within ``tol`` of it
    (A = 0, "g takes nothing", first)."""
    uu, aa = subset_pairs(n)
    cand = aa[uu == u]
    vals = f[u ^ cand] + g[cand]
    if tol <= 0.0:
        return int(cand[int(np.argmax(vals))])
    ok = np.flatnonzero(vals >= vals.max() - tol)
    return int(cand[ok[np.lexsort((cand[ok], np.bitwise_count(cand[ok])))[0]]])


class _Search:
    """Branch and bound over served sets.

    Every optimal solution induces a partition of the tasks into <= b served sets S_k (the tasks each chosen group
    serves), and its value is sum_k w(S_k) with w(S) = max_{G >= S} sum_{i in S} score(i, G); conversely the best
    superset of each part gives a selection at least that good. So we branch task by task (in ``order``) on which
    part it joins (an existing part, or a new one while fewer than b exist: restricted growth, no symmetric
    duplicates) and bound a node with parts P_k by sum_k w(P_k) + sum_{unplaced i} max(max_k U_i(P_k + i), best_i
    if a part can still be opened), U_i(P) = max_{G >= P} score(i, G): each unplaced task at its best possible
    score. Once at most ``tail`` tasks are left, the rest is solved exactly by a max-plus subset convolution:
    best(R) = max over splits of R into A_1..A_p (joining the parts) and <= r new parts of
    sum_k w(P_k + A_k) + sum w(new), in O((p + r) 3^|R|).
    """

    def __init__(
        self, table: np.ndarray, candidates: np.ndarray, k: int, budget: int, order: list[int], tail: int = 10
    ) -> None:
        self.k = k
        self.budget = budget
        self.order = order
        self.w = served_values(table, candidates, k)
        u = _superset_max(table, k)
        ar = np.arange(1 << k, dtype=np.int64)
        # reach[P, i] = U_i(P + i): the best score task i can get in a group containing P and i.
        self.reach = np.stack([u[ar | (1 << i), i] for i in range(k)], axis=1)
        self.best = self.reach[0].copy()
        self.rest = [np.array(order[p:], dtype=np.int64) for p in range(k + 1)]
        self.tail = min(tail, k)
        self.local: dict[int, np.ndarray] = {}
        self.new_chain: dict[tuple[int, int], list[np.ndarray]] = {}
        self.nodes = 0
        self.best_val = -math.inf
        self.best_parts: list[int] = []
        self.tol = 0.0

    # -- exact tail ------------------------------------------------------------------------------------------
    def _local(self, placed: int) -> np.ndarray:
        """Global masks of the 2^n subsets of the n unplaced tasks (local bit j = task order[placed + j])."""
        if placed not in self.local:
            rest = self.rest[placed]
            ar = np.arange(1 << len(rest), dtype=np.int64)
            g = np.zeros_like(ar)
            for j, t in enumerate(rest):
                g |= ((ar >> j) & 1) << np.int64(t)
            self.local[placed] = g
        return self.local[placed]

    def _conv(self, f: np.ndarray, g: np.ndarray, n: int) -> np.ndarray:
        return maxplus_conv(f, g, n)

    def _split(self, f: np.ndarray, g: np.ndarray, n: int, u: int) -> int:
        return maxplus_split(f, g, n, u)

    def _new_parts(self, placed: int, r: int) -> list[np.ndarray]:
        """[N_1, ..., N_r]: N_j(A) = best value of splitting local set A into <= j new parts."""
        n = self.k - placed
        r = min(r, n)
        key = (placed, r)
        if key not in self.new_chain:
            one = self.w[self._local(placed)].copy()
            one[0] = 0.0
            chain = [one]
            for _ in range(r - 1):
                chain.append(self._conv(chain[-1], one, n))
            self.new_chain[key] = chain
        return self.new_chain[key]

    def _tail(self, parts: list[int], placed: int, rebuild: bool = False) -> tuple[float, list[int]]:
        n = self.k - placed
        gm = self._local(placed)
        steps = [self.w[p | gm] for p in parts]
        r = self.budget - len(parts)
        chain = self._new_parts(placed, r) if r > 0 else []
        if chain:
            steps.append(chain[-1])
        acc = [steps[0]]
        for g in steps[1:]:
            acc.append(self._conv(acc[-1], g, n))
        value = float(acc[-1][-1])
        if not rebuild or value == -math.inf:
            return value, []
        u = (1 << n) - 1
        shares = [0] * len(steps)
        for s in range(len(steps) - 1, 0, -1):
            shares[s] = self._split(acc[s - 1], steps[s], n, u)
            u ^= shares[s]
        shares[0] = u
        out = [p | int(gm[a]) for p, a in zip(parts, shares, strict=False)]
        if chain:
            rem = shares[-1] if parts else shares[0]
            for j in range(len(chain) - 1, 0, -1):
                a = self._split(chain[j - 1], chain[0], n, rem)
                if a:
                    out.append(int(gm[a]))
                rem ^= a
            if rem:
                out.append(int(gm[rem]))
        return value, out

    # -- search ------------------------------------------------------------------------------------------------
    def bound(self, parts: list[int], value: float, placed: int) -> float:
        if self.k - placed <= self.tail:
            return self._tail(parts, placed)[0]
        rest = self.rest[placed]
        opt = self.reach[parts][:, rest].max(0) if parts else np.full(len(rest), -np.inf)
        if len(parts) < self.budget:
            opt = np.maximum(opt, self.best[rest])
        total = float(opt.sum())
        return value + total if total > -math.inf else -math.inf

    def run(self, incumbent: float, tol: float) -> None:
        self.best_val = incumbent
        self.tol = tol
        self._dfs([], 0.0, 0)

    def _dfs(self, parts: list[int], value: float, placed: int) -> None:
        self.nodes += 1
        if self.k - placed <= self.tail:
            val, full = self._tail(parts, placed, rebuild=True)
            if val > self.best_val + self.tol:
                self.best_val = val
                self.best_parts = full
            return
        bit = 1 << self.order[placed]
        w = self.w
        children = []
        for s, p in enumerate(parts):
            wv = w[p | bit]
            if wv > -math.inf:
                children.append(([*parts[:s], p | bit, *parts[s + 1 :]], value - w[p] + wv))
        if len(parts) < self.budget and w[bit] > -math.inf:
            children.append(([*parts, bit], value + w[bit]))
        scored = []
        for cp, val in children:
            b = self.bound(cp, float(val), placed + 1)
            if b > self.best_val + self.tol:
                scored.append((b, cp, float(val)))
        scored.sort(key=lambda c: -c[0])
        for b, cp, val in scored:
            if b > self.best_val + self.tol:
                self._dfs(cp, val, placed + 1)

    def group_for(self, table: np.ndarray, candidates: np.ndarray, part: int, tol: float = 0.0) -> int:
        """The smallest candidate group achieving w(part) (within ``tol``; then the lowest mask)."""
        sel = candidates[(candidates & part) == part]
        return int(sel[_smallest_attaining(table[sel], sel, np.zeros(len(sel)), part, tol)])


def select_exact(
    score: ScoreFn | TableScore | Candidates,
    tasks: Sequence[str],
    budget: float,
    max_group_size: int | None = None,
    warm_start: bool = False,
    dp_tail: int = 10,
    network_cost: float = 1.0,
) -> Grouping:
    """The provably best selection of networks whose costs add up to at most ``budget``.

    For a score (K <= 16), network selection of Standley et al. 2020 (Sec. 3.3) / TAG (Fifty et al. 2021,
    Sec. 3.3) by branch and bound: every group of up to ``max_group_size`` tasks is a candidate costing
    ``network_cost`` (so floor(budget / network_cost) networks); candidates dominated by a one-larger group that
    is at least as good for all their members, and better for one, are dropped; then :class:`_Search` branches on
    which served set each task joins, bounds by each unplaced task's best possible score, and solves the last
    ``dp_tail`` tasks exactly by a subset convolution (0: branch all the way; K <= dp_tail: that alone); each
    served set is trained by the smallest group that attains its value. ``warm_start`` seeds the incumbent with
    :func:`select_beam` (rarely worth its time). Optimal up to 1e-13 * K * max |score|, far above rounding.
    ``nodes`` counts search nodes. Cost: 3^K work up front (under a second at K = 16), then the search.

    For :class:`Candidates` (K <= 14, any real costs and budget), see :func:`_exact_candidates`.
    """
    if isinstance(score, Candidates):
        return _exact_candidates(score, tasks, budget, max_group_size)
    t0 = time.perf_counter()
    sc = _as_table_score(score, tasks)
    k = len(sc.tasks)
    m, count = _check_budget(k, budget, max_group_size, network_cost)
    if k > EXACT_MAX_TASKS:
        raise ConfigError(f"select_exact handles at most {EXACT_MAX_TASKS} tasks (got {k}); use select_beam")
    masks = _all_masks(k, m)
    table = np.full((1 << k, k), -np.inf)
    table[masks] = _checked_table(sc, masks)
    dom = dominated(table, masks, k)
    table[masks[dom]] = -np.inf
    warm: Grouping | None = None
    if warm_start:
        try:
            warm = select_beam(sc, tasks, budget, beam_width=8, max_group_size=m, network_cost=network_cost)
        except DataError:
            warm = None
    incumbent = warm.total if warm is not None else -math.inf
    fin = np.isfinite(table)
    # Sums of <= K scores differ by rounding only far below this; the answer is optimal up to it.
    tol = 1e-13 * k * max(1.0, float(np.abs(table[fin]).max()) if fin.any() else 1.0)
    spread = [float(np.ptp(table[fin[:, i], i])) if fin[:, i].any() else 0.0 for i in range(k)]
    order = sorted(range(k), key=lambda i: -spread[i])
    cands = masks[~dom]
    if dp_tail < 0:
        raise ConfigError(f"select_exact: dp_tail must be >= 0, got {dp_tail}")
    search = _Search(table, cands, k, count, order, tail=dp_tail)
    search.run(incumbent - tol, tol)
    if search.best_parts:
        chosen = np.array([search.group_for(table, cands, p, tol) for p in search.best_parts], dtype=np.int64)
    elif warm is None:
        raise DataError("select_exact: no selection covers every task with a finite score")
    else:
        idx = {name: i for i, name in enumerate(sc.tasks)}
        chosen = np.array([to_mask(idx[x] for x in g) for g in warm.groups], dtype=np.int64)
    meta = {
        "budget": float(budget),
        "network_cost": float(network_cost),
        "networks_allowed": count,
        "max_group_size": m,
        "optimal": True,
        "candidates": len(masks),
        "dominated": int(dom.sum()),
        "dp_tail": min(dp_tail, k),
        "incumbent_from_beam": float(incumbent) if warm is not None else None,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    return _result(sc, chosen, "exact", search.nodes, meta, unit_cost=network_cost)



#: the exact candidate-list solver's limits: tasks, and max-plus convolutions over 3^K pairs
EXACT_MAX_TASKS_CANDIDATES = 14
EXACT_MAX_CONVOLUTIONS = 4000


def _candidate_set(cands: Candidates, tasks: Sequence[str], max_group_size: int | None) -> tuple[Candidates, int]:
    if list(tasks) != list(cands.tasks):
        raise DataError(f"grouping: the candidates are over tasks {cands.tasks}, the solver was given {list(tasks)}")
    k = len(cands.tasks)
    m = k if max_group_size is None else int(max_group_size)
    if m < 1:
        raise ConfigError(f"grouping: max_group_size must be >= 1, got {max_group_size!r}")
    return cands, min(m, k)


def _exact_candidates(cands: Candidates, tasks: Sequence[str], budget: float,
                      max_group_size: int | None = None) -> Grouping:
    """Exact network selection over a candidate list with real costs (Standley et al. 2020, Sec. 3.3: half-size
    single-task networks at 0.5 beside full-size networks at 1, budgets in steps of 0.5).

    Any optimal selection serves the tasks in parts S_1..S_n, each part by one network, so its value is the sum of
    w_c(S) = the best sum over S of a network of cost c containing S. Per distinct cost c the max-plus subset
    convolutions N_c^j = best split of a task set into <= j parts served by cost-c networks are built for
    j <= budget / c; a search over how many networks of each cost fit the budget combines them, and the full
    task set's value of the best combination is the optimum (exact; 3^K work per convolution). Ties (within
    rounding) go to the cheaper selection, then to fewer networks, and each part to its cheapest, then smallest,
    network. Standley et al.'s own search (taskgrouping, network_selection/main.cpp) keeps a tied selection it
    meets later; this one says which it keeps.
    """
    t0 = time.perf_counter()
    cands, m = _candidate_set(cands, tasks, max_group_size)
    k = len(cands.tasks)
    if k > EXACT_MAX_TASKS_CANDIDATES:
        raise ConfigError(f"select_exact handles at most {EXACT_MAX_TASKS_CANDIDATES} tasks with a candidate list "
                          f"(got {k}); use select_beam")
    b = _check_real_budget(budget)
    eps = 1e-9 * max(1.0, b)
    usable = np.flatnonzero((cands.costs <= b + eps) & (np.bitwise_count(cands.masks) <= m))
    if not len(usable):
        raise ConfigError(f"grouping: budget {budget!r} buys no candidate network (the cheapest costs "
                          f"{cands.costs.min():g})")
    fin = np.isfinite(cands.rows[usable])
    tol = 1e-13 * k * max(1.0, float(np.abs(cands.rows[usable][fin]).max()))
    full = (1 << k) - 1
    classes = sorted({float(c) for c in cands.costs[usable]})
    chains: dict[float, tuple[np.ndarray, list[np.ndarray]]] = {}
    convs = 0

    def conv(f: np.ndarray, g: np.ndarray) -> np.ndarray:
        nonlocal convs
        convs += 1
        if convs > EXACT_MAX_CONVOLUTIONS:
            raise ConfigError(f"select_exact: {len(classes)} distinct network costs need more than "
                              f"{EXACT_MAX_CONVOLUTIONS} subset convolutions; round the costs or use select_beam")
        return maxplus_conv(f, g, k)

    for c in classes:
        sel = usable[cands.costs[usable] == c]
        one = served_values_rows(cands.rows[sel], cands.masks[sel], k)
        one[0] = 0.0  # "no network of this cost" is allowed
        chain = [one]
        for _ in range(min(math.floor(b / c + eps), k) - 1):
            chain.append(conv(chain[-1], one))
        chains[c] = (sel, chain)

    leaves: list[tuple[float, tuple[int, ...]]] = []

    def search(ci: int, acc: np.ndarray | None, left: float, counts: tuple[int, ...]) -> None:
        if ci == len(classes):
            if acc is not None:
                leaves.append((float(acc[full]), counts))
            return
        c = classes[ci]
        top = min(len(chains[c][1]), math.floor(left / c + eps))
        for n in ([top] if ci == len(classes) - 1 else range(top + 1)):  # the last cost: as many as fit
            step = chains[c][1][n - 1] if n else None
            nxt = acc if step is None else step if acc is None else conv(acc, step)
            search(ci + 1, nxt, left - n * c, (*counts, n))

    search(0, None, b, ())
    best_val = max((v for v, _ in leaves), default=-math.inf)
    if best_val == -math.inf:
        raise DataError(f"select_exact: no selection of candidate networks within budget {budget!r} covers every "
                        "task")
    tied = sorted((lf for lf in leaves if lf[0] >= best_val - tol), key=lambda lf: -lf[0])[:32]
    picks = [_rebuild(cands, classes, chains, counts, k, tol) for _, counts in tied]
    chosen = min(picks, key=lambda p: (float(cands.costs[p].sum()), len(p),
                                       int(np.bitwise_count(cands.masks[p]).sum())))
    meta = {
        "budget": b,
        "max_group_size": m,
        "optimal": True,
        "candidates": len(usable),
        "costs": classes,
        "convolutions": convs,
        "higher_is_better": cands.higher_is_better,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    return _candidate_result(cands, chosen, "exact", len(leaves), meta)


def _rebuild(cands: Candidates, classes: list[float], chains: dict[float, tuple[np.ndarray, list[np.ndarray]]],
             counts: tuple[int, ...], k: int, tol: float) -> list[int]:
    """The candidate networks of an optimal selection with ``counts`` networks of each cost, fewest first."""
    steps = [(chains[c][0], chains[c][1][:n]) for c, n in zip(classes, counts, strict=True) if n]
    accs = [steps[0][1][-1]]
    for _, chain in steps[1:]:
        accs.append(maxplus_conv(accs[-1], chain[-1], k))
    u = (1 << k) - 1
    shares = [0] * len(steps)
    for s in range(len(steps) - 1, 0, -1):
        shares[s] = maxplus_split(accs[s - 1], steps[s][1][-1], k, u, tol)
        u ^= shares[s]
    shares[0] = u
    chosen: list[int] = []
    for (sel, chain), share in zip(steps, shares, strict=True):
        parts, rem = [], share
        for j in range(len(chain) - 1, 0, -1):  # chain[j] = chain[j-1] * chain[0]: peel one part off at a time
            a = maxplus_split(chain[j - 1], chain[0], k, rem, tol)
            if a:
                parts.append(a)
            rem ^= a
        if rem:
            parts.append(rem)
        for part in parts:
            sup = sel[(cands.masks[sel] & part) == part]
            r = int(sup[_smallest_attaining(cands.rows[sup], cands.masks[sup], cands.costs[sup], part, tol)])
            if r not in chosen:
                chosen.append(r)
    return chosen


def _candidate_result(cands: Candidates, chosen: Sequence[int], solver: str, nodes: int,
                      meta: dict[str, Any]) -> Grouping:
    """The grouping of candidate networks ``chosen``, listed canonically, values in the candidates' units."""
    order = sorted(set(int(r) for r in chosen),
                   key=lambda r: (from_mask(int(cands.masks[r])), cands.costs[r], cands.networks[r].label, r))
    rows = cands.rows[order]
    masks = cands.masks[order]
    g = _assemble(list(cands.tasks), rows, masks, cands.costs[order], [cands.networks[r].label for r in order],
                  solver, nodes, meta, sign=1.0 if cands.higher_is_better else -1.0)
    return g


# --------------------------------------------------------------------------------------------------------------
# Beam: greedy candidates, beam selection, local search
# --------------------------------------------------------------------------------------------------------------
def candidate_pool(score: TableScore, m: int, enumerate_up_to: int = 12) -> np.ndarray:
    """Candidate groups for the heuristic: every group when K <= ``enumerate_up_to``; otherwise each singleton
    and each pair grown one task at a time (the task that most raises the group's total served score), keeping
    every intermediate group, plus the all-task group. O(K^3) table rows."""
    k = len(score.tasks)
    if k <= enumerate_up_to:
        return _all_masks(k, m)
    bits = (1 << np.arange(k, dtype=np.int64)).astype(np.int64)
    seeds = [int(b) for b in bits]
    if m >= 2:
        seeds += [int(bits[i] | bits[j]) for i in range(k) for j in range(i + 1, k)]
    pool = set(seeds)
    cur = np.array([s for s in seeds if bin(s).count("1") >= 2], dtype=np.int64)
    size = 2
    while size < m and len(cur):
        ext = cur[:, None] | bits[None, :]
        ok = ext != cur[:, None]
        flat = ext[ok]
        t = _checked_table(score, flat)
        tot = np.where(np.isfinite(t), t, 0.0).sum(1)
        gain = np.full(ext.shape, -np.inf)
        gain[ok] = tot
        pick = ext[np.arange(len(cur)), gain.argmax(1)]
        cur = np.unique(pick)
        pool.update(int(x) for x in cur)
        size += 1
    if m >= k:
        pool.add((1 << k) - 1)
    return np.array(sorted(pool), dtype=np.int64)


def select_beam(
    score: ScoreFn | TableScore | Candidates,
    tasks: Sequence[str],
    budget: float,
    beam_width: int = 16,
    max_group_size: int | None = None,
    local_search: bool = True,
    network_cost: float = 1.0,
) -> Grouping:
    """A good selection of networks within ``budget`` for any K (seconds at K = 30+), no optimality proof.

    For a score, candidates from :func:`candidate_pool`, each costing ``network_cost``; for :class:`Candidates`,
    the listed networks. A beam search adds one network per step, keeping the ``beam_width`` best partial
    selections (a task not yet covered counts at the 25th percentile of its candidate values; a selection whose
    remaining budget cannot cover the uncovered tasks is dropped; for a score, the set of uncovered tasks is offered
    as an extra candidate so coverage stays reachable; every kept selection is also completed by a greedy set
    cover, a complete candidate when it fits the budget); then local search: swap one network for another that fits
    the budget (for a score, also for itself with one task added or removed), or add one, while that helps. Last,
    each chosen network is replaced by the cheapest, then smallest, one that gives the tasks it serves the same
    values (the tie rule of :func:`select_exact`).
    """
    t0 = time.perf_counter()
    if beam_width < 1:
        raise ConfigError(f"select_beam: beam_width must be >= 1, got {beam_width}")
    if isinstance(score, Candidates):
        cands, m = _candidate_set(score, tasks, max_group_size)
        b = _check_real_budget(budget)
        keep = np.flatnonzero(np.bitwise_count(cands.masks) <= m)
        pool = _Pool(cands.rows[keep], cands.masks[keep], cands.costs[keep], None, m)
    else:
        sc = _as_table_score(score, tasks)
        m, count = _check_budget(len(sc.tasks), budget, max_group_size, network_cost)
        b = count * float(network_cost)
        masks = candidate_pool(sc, m)
        pool = _Pool(_checked_table(sc, masks), masks, np.full(len(masks), float(network_cost)), sc, m)
    chosen, nodes = pool.beam(b, beam_width)
    if local_search:
        chosen, spent = pool.polish(chosen, b)
        nodes += spent
    chosen = pool.prefer_smaller(chosen)
    meta = {
        "budget": float(budget),
        "max_group_size": m,
        "optimal": False,
        "beam_width": int(beam_width),
        "candidates": pool.n_listed,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    if isinstance(score, Candidates):
        meta["higher_is_better"] = cands.higher_is_better
        return _candidate_result(cands, [int(keep[r]) for r in chosen], "beam", nodes, meta)
    meta |= {"network_cost": float(network_cost), "networks_allowed": count}
    return _result(sc, pool.masks[chosen], "beam", nodes, meta, unit_cost=network_cost)


class _Pool:
    """The networks the heuristic may pick: rows of values (higher is better, -inf off the network), task masks
    and costs. With a score (``sc``), networks it makes up on the way (the uncovered tasks, one task flipped) are
    appended."""

    def __init__(self, rows: np.ndarray, masks: np.ndarray, costs: np.ndarray, sc: TableScore | None, m: int) -> None:
        self.rows, self.masks, self.costs = np.asarray(rows, dtype=np.float64), np.asarray(masks, np.int64), costs
        self.sc, self.m = sc, m
        self.n_listed = len(masks)
        self.k = self.rows.shape[1]
        fin = np.isfinite(self.rows)
        self.tol = 1e-12 * max(1.0, float(np.abs(self.rows[fin]).max()) if fin.any() else 1.0)
        self.unit = float(costs.min()) if len(costs) else 1.0
        # the cheapest network holding each task: a lower bound on what covering it still costs
        self.min_cost = np.array([costs[fin[:, j]].min() if fin[:, j].any() else np.inf for j in range(self.k)])
        with warnings.catch_warnings():  # a task in no network: an all-NaN column, handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            lo = np.nanquantile(np.where(fin, self.rows, np.nan), 0.25, axis=0) if fin.any() else np.zeros(self.k)
        self.lo = np.where(np.isfinite(lo), lo, 0.0)
        self.index = {int(mk): r for r, mk in enumerate(self.masks)} if sc is not None else {}

    def add(self, masks: np.ndarray) -> np.ndarray:
        """Row indices of the score's groups ``masks``, appending those not in the pool yet (scores only)."""
        assert self.sc is not None
        new = sorted({int(mk) for mk in masks} - self.index.keys())
        if new:
            arr = np.array(new, dtype=np.int64)
            start = len(self.masks)
            self.rows = np.vstack([self.rows, _checked_table(self.sc, arr)])
            self.masks = np.concatenate([self.masks, arr])
            self.costs = np.concatenate([self.costs, np.full(len(arr), self.unit)])
            self.index |= {mk: start + i for i, mk in enumerate(new)}
        return np.array([self.index[int(mk)] for mk in masks], dtype=np.int64)

    def cover_cost(self, uncovered: np.ndarray) -> np.ndarray:
        """A lower bound on the cost of covering each row's uncovered tasks (n x K boolean)."""
        n_unc = uncovered.sum(1)
        worst = np.where(uncovered, self.min_cost[None, :], 0.0).max(1) if uncovered.shape[1] else np.zeros(len(n_unc))
        return np.maximum(worst, np.ceil(n_unc / self.m) * self.unit)

    def beam(self, budget: float, width: int) -> tuple[list[int], int]:
        eps = 1e-9 * max(1.0, budget)
        nodes = 0
        beam: list[tuple[tuple[int, ...], np.ndarray, float]] = [((), np.full(self.k, -np.inf), 0.0)]
        complete: list[tuple[float, float, tuple[int, ...]]] = []
        first = self.cover_greedily((), beam[0][1], 0.0, budget)
        if first is not None:
            complete.append(first)
        for _ in range(int(budget / self.unit + eps) + 1):
            cand: list[tuple[float, tuple[int, ...], np.ndarray, float]] = []
            for chosen, cur, spent in beam:
                unc = ~np.isfinite(cur)
                idx = np.arange(len(self.masks))
                if self.sc is not None and unc.any() and unc.sum() <= self.m:  # the uncovered set, as one network
                    idx = np.unique(np.append(idx, self.add(np.array([to_mask(np.flatnonzero(unc))]))))
                fits = spent + self.costs[idx] <= budget + eps
                idx = idx[fits]
                new = np.maximum(cur[None, :], self.rows[idx])
                fin = np.isfinite(new)
                left = budget - spent - self.costs[idx]
                feasible = self.cover_cost(~fin) <= left + eps
                key = np.where(fin, new, self.lo[None, :]).sum(1)
                key[~feasible] = -np.inf
                nodes += len(idx)
                for r in np.argsort(-key, kind="stable")[: width * 2]:
                    if key[r] == -np.inf:
                        break
                    if int(idx[r]) in chosen:
                        continue
                    cand.append((float(key[r]), tuple(sorted((*chosen, int(idx[r])))), new[r],
                                 spent + float(self.costs[idx[r]])))
            seen: set[tuple[int, ...]] = set()
            beam = []
            for _, chosen, cur, spent in sorted(cand, key=lambda c: (-c[0], c[3])):
                if chosen in seen:
                    continue
                seen.add(chosen)
                beam.append((chosen, cur, spent))
                done = self.cover_greedily(chosen, cur, spent, budget)
                if done is not None:
                    complete.append(done)
                if len(beam) >= width:
                    break
            if not beam:
                break
        if not complete:
            raise DataError("select_beam: found no selection within the budget that covers every task "
                            "(check the scores for -inf and the costs)")
        best = max(complete, key=lambda c: (c[0], -c[1]))
        return list(best[2]), nodes

    def cover_greedily(self, chosen: tuple[int, ...], cur: np.ndarray, spent: float,
                       budget: float) -> tuple[float, float, tuple[int, ...]] | None:
        """The selection completed by the greedy set cover (most newly covered tasks per unit cost, then the
        larger gain in value) within the budget: (value, cost, networks), or None when it does not cover all.
        Keeps a covering selection in reach when the cost lower bound admits partial ones that cannot be
        completed."""
        eps = 1e-9 * max(1.0, budget)
        chosen, cur = list(chosen), cur.copy()
        while not np.isfinite(cur).all():
            fits = np.flatnonzero(spent + self.costs <= budget + eps)
            if not len(fits):
                return None
            unc = ~np.isfinite(cur)
            new = np.isfinite(self.rows[fits]) & unc[None, :]
            gain = new.sum(1) / self.costs[fits]
            if gain.max() <= 0:
                return None
            value = np.where(new, self.rows[fits], 0.0).sum(1)
            r = int(fits[np.lexsort((-value, -gain))[0]])
            chosen.append(r)
            cur = np.maximum(cur, self.rows[r])
            spent += float(self.costs[r])
        return float(cur.sum()), spent, tuple(sorted(chosen))

    def polish(self, chosen: list[int], budget: float) -> tuple[list[int], int]:
        """Local search: replace one chosen network by another that fits the budget (with a score, also by itself
        with one task added or removed), or add one, while that raises the total (at most 100 passes)."""
        eps = 1e-9 * max(1.0, budget)
        bits = np.int64(1) << np.arange(self.k, dtype=np.int64)
        chosen = list(chosen)
        value = float(self.rows[chosen].max(0).sum())
        spent = 0
        for _ in range(100):
            improved = False
            for pos in range(len(chosen) + 1):  # pos == len(chosen): add a network
                others = [c for q, c in enumerate(chosen) if q != pos]
                base = self.rows[others].max(0) if others else np.full(self.k, -np.inf)
                room = budget - float(self.costs[others].sum()) if others else budget
                idx = np.arange(len(self.masks))
                if self.sc is not None and pos < len(chosen):
                    flips = self.masks[chosen[pos]] ^ bits
                    flips = flips[(flips != 0) & (np.bitwise_count(flips) <= self.m)]
                    if len(flips):
                        idx = np.unique(np.append(idx, self.add(flips)))
                idx = idx[self.costs[idx] <= room + eps]
                if not len(idx):
                    continue
                new = np.maximum(base[None, :], self.rows[idx])
                fin = np.isfinite(new).all(1)
                tot = np.where(fin, np.where(fin[:, None], new, 0.0).sum(1), -np.inf)
                spent += len(idx)
                r = int(np.argmax(tot))
                if tot[r] > value + 1e-12 * max(1.0, abs(value)) and int(idx[r]) not in chosen:
                    if pos < len(chosen):
                        chosen[pos] = int(idx[r])
                    else:
                        chosen.append(int(idx[r]))
                    value = float(tot[r])
                    improved = True
            if not improved:
                break
        return chosen, spent

    def prefer_smaller(self, chosen: list[int]) -> list[int]:
        """Each chosen network replaced by the cheapest, then smallest, network that gives the tasks it serves at
        least the values they have (the solvers' tie rule); networks serving nothing are dropped by the caller."""
        rows = self.rows[chosen]
        best = rows.max(0)
        owner = []  # each task's server: attaining its best, the cheapest, then smallest network
        for j in range(self.k):
            ok = np.flatnonzero(rows[:, j] >= best[j] - self.tol)
            ch = np.asarray(chosen)[ok]
            owner.append(int(ok[np.lexsort((ok, np.bitwise_count(self.masks[ch]), self.costs[ch]))[0]]))
        out: list[int] = []
        for q, r in enumerate(chosen):
            part = to_mask(j for j in range(self.k) if owner[j] == q)
            if not part:
                continue
            idx = np.flatnonzero((self.masks & part) == part)
            if self.sc is not None:  # every group between the served set and the network is a candidate
                free = [i for i in from_mask(int(self.masks[r])) if not part >> i & 1]
                if len(free) <= 12:
                    subs = np.array([part | to_mask(c) for n in range(len(free) + 1)
                                     for c in itertools.combinations(free, n)], dtype=np.int64)
                    idx = np.unique(np.append(idx, self.add(subs)))
            bits = list(from_mask(part))
            ok = idx[(self.rows[idx][:, bits] >= best[bits] - self.tol).all(1)]
            pick = int(ok[np.lexsort((ok, self.masks[ok], np.bitwise_count(self.masks[ok]), self.costs[ok]))[0]])
            if pick not in out:
                out.append(pick)
        return out


# --------------------------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------------------------
GROUP_SCORES: Registry[Any] = Registry("group score")
GROUPING_SOLVERS: Registry[Any] = Registry("grouping solver")


class TagParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    singleton_score: float = Field(TAG_SINGLETON_SCORE, description="score of a task alone in its group")


class ExactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_group_size: int | None = Field(None, ge=1, description="largest group considered (default: all tasks)")
    network_cost: float = Field(1.0, gt=0, description="cost of each network of a score (candidate lists: their own)")


class BeamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beam_width: int = Field(16, ge=1, description="partial selections kept per step")
    max_group_size: int | None = Field(None, ge=1, description="largest group considered (default: all tasks)")
    local_search: bool = Field(True, description="polish the answer with one-group swaps")
    network_cost: float = Field(1.0, gt=0, description="cost of each network of a score (candidate lists: their own)")


@GROUP_SCORES.register("tag", params=TagParams, summary="mean affinity onto each task from its group mates",
                       paper="Fifty et al. 2021, Efficiently Identifying Task Groupings for Multi-Task Learning")
def _tag(params: TagParams, aff: AffinityMatrix) -> TagScore:
    return TagScore(aff, params.singleton_score)


@GROUP_SCORES.register("hoa", summary="higher-order approximation from pairwise networks",
                       paper="Standley et al. 2020, Which Tasks Should Be Learned Together in Multi-task Learning?")
def _hoa(params: NoParams, aff: AffinityMatrix) -> HoaScore:
    return HoaScore(aff)


@GROUPING_SOLVERS.register("exact", params=ExactParams,
                           summary="provably optimal: branch and bound for scores (K <= 16), subset convolutions "
                           "for candidate lists with costs (K <= 14)",
                           paper="Standley et al. 2020; Fifty et al. 2021 (network selection)")
def _exact(params: ExactParams, score: TableScore | Candidates, tasks: Sequence[str], budget: float) -> Grouping:
    return select_exact(score, tasks, budget, params.max_group_size, network_cost=params.network_cost)


@GROUPING_SOLVERS.register("beam", params=BeamParams, summary="greedy candidates + beam selection, any K")
def _beam(params: BeamParams, score: TableScore | Candidates, tasks: Sequence[str], budget: float) -> Grouping:
    return select_beam(score, tasks, budget, params.beam_width, params.max_group_size, params.local_search,
                       params.network_cost)
