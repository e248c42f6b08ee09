"""Task grouping under a budget: which <= b multi-task networks to train so every task is served well.

The problem (Standley et al. 2020, "Which Tasks Should Be Learned Together in Multi-task Learning?", Sec. 3.3
network selection; Fifty et al. 2021, "Efficiently Identifying Task Groupings for Multi-Task Learning" (TAG),
Sec. 3.3): choose at most ``b`` groups (subsets of the tasks, overlap allowed) that together contain every task;
each task is served by the chosen group that is best FOR IT; maximise the sum over tasks of that best score.

Everything runs on a per-task group score ``score(j, G)`` (task index ``j`` in group ``G``, a sorted tuple of task
indices; higher is better). :class:`TagScore` and :class:`HoaScore` build it from an :class:`AffinityMatrix`;
any callable works. :func:`select_exact` returns the provable optimum for K <= 16; :func:`select_beam` is the
heuristic for larger K.
"""

from __future__ import annotations

import math
import time
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
# Result
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Grouping:
    """Chosen groups, which group serves each task (index into ``groups``), and the scores."""

    groups: list[list[str]]
    assignment: dict[str, int]
    total: float
    per_task: dict[str, float]
    solver: str
    nodes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": [list(g) for g in self.groups],
            "assignment": dict(self.assignment),
            "total": _jsonable(float(self.total)),
            "per_task": _jsonable({k: float(v) for k, v in self.per_task.items()}),
            "solver": self.solver,
            "nodes": int(self.nodes),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grouping:
        return cls(
            groups=[list(g) for g in data["groups"]],
            assignment={k: int(v) for k, v in data["assignment"].items()},
            total=float(data["total"]) if data["total"] is not None else -math.inf,
            per_task={k: (float(v) if v is not None else -math.inf) for k, v in data["per_task"].items()},
            solver=str(data["solver"]),
            nodes=int(data.get("nodes", 0)),
            meta=dict(data.get("meta", {})),
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
    sc: TableScore, masks: np.ndarray, solver: str, nodes: int, meta: dict[str, Any], drop_idle: bool = True
) -> Grouping:
    tasks = list(sc.tasks)
    uniq = sorted({int(m) for m in masks}, key=lambda m: (from_mask(m), m))
    masks = np.array(uniq, dtype=np.int64)
    t = _checked_table(sc, masks) if len(masks) else np.full((0, len(tasks)), -np.inf)
    best = t.argmax(0) if len(masks) else np.zeros(len(tasks), dtype=int)
    vals = t[best, np.arange(len(tasks))] if len(masks) else np.full(len(tasks), -np.inf)
    uncovered = [tasks[j] for j in range(len(tasks)) if not np.isfinite(vals[j])]
    if uncovered:
        raise DataError(f"grouping: tasks {uncovered} are in no chosen group (or have no finite score in one)")
    if drop_idle:  # a group that is best for no task adds nothing: do not train it
        used = sorted(set(best.tolist()))
        masks, best = masks[used], np.searchsorted(used, best)
    return Grouping(
        groups=[[tasks[i] for i in from_mask(int(m))] for m in masks],
        assignment={tasks[j]: int(best[j]) for j in range(len(tasks))},
        total=float(vals.sum()),
        per_task={tasks[j]: float(vals[j]) for j in range(len(tasks))},
        solver=solver,
        nodes=int(nodes),
        meta=meta,
    )


def _check_budget(k: int, budget: int, max_group_size: int | None) -> int:
    if k < 1:
        raise DataError("grouping: needs at least one task")
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ConfigError(f"grouping: budget must be an integer >= 1, got {budget!r}")
    m = k if max_group_size is None else int(max_group_size)
    if m < 1:
        raise ConfigError(f"grouping: max_group_size must be >= 1, got {max_group_size!r}")
    m = min(m, k)
    if budget * m < k:
        raise ConfigError(f"grouping: {budget} group(s) of at most {m} tasks cannot cover {k} tasks")
    return m


# --------------------------------------------------------------------------------------------------------------
# Exact: branch and bound
# --------------------------------------------------------------------------------------------------------------
def _all_masks(k: int, m: int) -> np.ndarray:
    masks = np.arange(1, 1 << k, dtype=np.int64)
    return masks[np.bitwise_count(masks) <= m]


def dominated(table: np.ndarray, masks: np.ndarray, k: int) -> np.ndarray:
    """Which candidate groups are dominated by a candidate with one more task that is at least as good for
    every member (dropping them never changes the optimum: swap G for G + {t} in any solution).

    ``table`` is indexed by mask (row m = group m; -inf rows are not candidates)."""
    out = np.zeros(len(masks), dtype=bool)
    mem = members(masks, k)
    for t in range(k):
        sel = ~mem[:, t]
        g = masks[sel]
        h = g | (1 << t)
        h_ok = np.isfinite(table[h]).any(1)
        ge = np.where(mem[sel], table[h] >= table[g], True).all(1)
        out[np.flatnonzero(sel)[h_ok & ge]] = True
    return out


def _superset_max(table: np.ndarray, k: int) -> np.ndarray:
    """U[P, i] = max over candidate groups G containing P of table[G, i] (sum-over-supersets with max)."""
    u = table.copy()
    for b in range(k):
        v = u.reshape(-1, 2, 1 << b, u.shape[1])
        np.maximum(v[:, 0], v[:, 1], out=v[:, 0])
    return u


def served_values(table: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """w[S] = max over candidate groups G containing S of sum_{i in S} table[G, i], for every task set S.

    Each candidate contributes the 2^|G| subset sums of its row, built by doubling and scattered with a max
    (sum over candidates of 2^|G| <= 3^K work: 43M adds at K = 16)."""
    w = np.full(1 << k, -np.inf)
    sizes = np.bitwise_count(candidates)
    for g in range(1, k + 1):
        groups = candidates[sizes == g]
        if not len(groups):
            continue
        idx = np.nonzero(members(groups, k))[1].reshape(len(groups), g)
        vals = table[groups[:, None], idx]
        chunk = max(1, (1 << 22) >> g)
        for s in range(0, len(groups), chunk):
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
        self.pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.local: dict[int, np.ndarray] = {}
        self.new_chain: dict[tuple[int, int], list[np.ndarray]] = {}
        self.nodes = 0
        self.best_val = -math.inf
        self.best_parts: list[int] = []
        self.tol = 0.0

    # -- exact tail ------------------------------------------------------------------------------------------
    def _pairs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """All (U, A) with A a subset of U, over n local bits: 3^n pairs."""
        if n not in self.pairs:
            uu = np.zeros(1, dtype=np.int64)
            aa = np.zeros(1, dtype=np.int64)
            for b in range(n):
                bit = np.int64(1 << b)
                uu = np.concatenate([uu, uu | bit, uu | bit])
                aa = np.concatenate([aa, aa, aa | bit])
            self.pairs[n] = (uu, aa)
        return self.pairs[n]

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
        """(f * g)(U) = max over A subset of U of f(U minus A) + g(A)."""
        uu, aa = self._pairs(n)
        out = np.full(1 << n, -np.inf)
        np.maximum.at(out, uu, f[uu ^ aa] + g[aa])
        return out

    def _split(self, f: np.ndarray, g: np.ndarray, n: int, u: int) -> int:
        """An A attaining (f * g)(u)."""
        uu, aa = self._pairs(n)
        cand = aa[uu == u]
        return int(cand[int(np.argmax(f[u ^ cand] + g[cand]))])

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

    def group_for(self, table: np.ndarray, candidates: np.ndarray, part: int) -> int:
        """A candidate group achieving w(part)."""
        sel = candidates[(candidates & part) == part]
        pb = [i for i in range(self.k) if part >> i & 1]
        return int(sel[int(np.argmax(table[np.ix_(sel, pb)].sum(1)))])


def select_exact(
    score: ScoreFn | TableScore,
    tasks: Sequence[str],
    budget: int,
    max_group_size: int | None = None,
    warm_start: bool = False,
    dp_tail: int = 10,
) -> Grouping:
    """The provably best <= ``budget`` groups (K <= 16) by branch and bound.

    Network selection of Standley et al. 2020 (Sec. 3.3) / TAG (Fifty et al. 2021, Sec. 3.3): every group of up
    to ``max_group_size`` tasks is a candidate; candidates dominated by a one-larger group that is at least as good
    for all their members are dropped; then :class:`_Search` branches on which served set each task joins, bounds
    by each unplaced task's best possible score, and solves the last ``dp_tail`` tasks exactly by a subset
    convolution (0: branch all the way; K <= dp_tail: that alone). ``warm_start`` seeds the incumbent with
    :func:`select_beam` (rarely worth its time). Optimal up to 1e-13 * K * max |score|, far above
    rounding. ``nodes`` counts search nodes. Cost: 3^K work up front (under a second at K = 16), then the search.
    """
    t0 = time.perf_counter()
    sc = _as_table_score(score, tasks)
    k = len(sc.tasks)
    m = _check_budget(k, budget, max_group_size)
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
            warm = select_beam(sc, tasks, budget, beam_width=8, max_group_size=m)
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
    search = _Search(table, cands, k, budget, order, tail=dp_tail)
    search.run(incumbent - tol, tol)
    if search.best_parts:
        chosen = np.array([search.group_for(table, cands, p) for p in search.best_parts], dtype=np.int64)
    elif warm is None:
        raise DataError("select_exact: no selection covers every task with a finite score")
    else:
        idx = {name: i for i, name in enumerate(sc.tasks)}
        chosen = np.array([to_mask(idx[x] for x in g) for g in warm.groups], dtype=np.int64)
    meta = {
        "budget": int(budget),
        "max_group_size": m,
        "optimal": True,
        "candidates": len(masks),
        "dominated": int(dom.sum()),
        "dp_tail": min(dp_tail, k),
        "incumbent_from_beam": float(incumbent) if warm is not None else None,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    return _result(sc, chosen, "exact", search.nodes, meta)


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
    score: ScoreFn | TableScore,
    tasks: Sequence[str],
    budget: int,
    beam_width: int = 16,
    max_group_size: int | None = None,
    local_search: bool = True,
) -> Grouping:
    """A good <= ``budget`` grouping for any K (seconds at K = 30+), no optimality proof.

    Candidates from :func:`candidate_pool`; then a beam search adds one group per step, keeping the
    ``beam_width`` best partial selections (a task not yet covered counts at the 25th percentile of its candidate
    scores; a selection that can no longer cover everyone is dropped; the set of uncovered tasks is offered as an
    extra candidate so coverage stays reachable); then local search: swap one group for a pool group, or for
    itself with one task added or removed, while that helps.
    """
    t0 = time.perf_counter()
    sc = _as_table_score(score, tasks)
    k = len(sc.tasks)
    m = _check_budget(k, budget, max_group_size)
    if beam_width < 1:
        raise ConfigError(f"select_beam: beam_width must be >= 1, got {beam_width}")
    pool = candidate_pool(sc, m)
    tp = _checked_table(sc, pool)
    finite = np.isfinite(tp)
    with np.errstate(all="ignore"):
        lo = np.nanquantile(np.where(finite, tp, np.nan), 0.25, axis=0) if finite.any() else np.zeros(k)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    nodes = 0
    beam: list[tuple[tuple[int, ...], np.ndarray]] = [((), np.full(k, -np.inf))]
    complete: list[tuple[float, tuple[int, ...]]] = []
    extra: dict[int, np.ndarray] = {}
    for step in range(budget):
        left = budget - step - 1
        cand: list[tuple[float, tuple[int, ...], np.ndarray]] = []
        for chosen, cur in beam:
            unc = ~np.isfinite(cur)
            new, masks = np.maximum(cur[None, :], tp), pool
            umask = to_mask(np.flatnonzero(unc))
            if unc.any() and unc.sum() <= m:
                if umask not in extra:
                    extra[umask] = _checked_table(sc, np.array([umask], dtype=np.int64))[0]
                new = np.vstack([new, np.maximum(cur, extra[umask])[None, :]])
                masks = np.append(pool, umask)
            fin = np.isfinite(new)
            n_unc = (~fin).sum(1)
            feasible = n_unc <= left * m
            key = np.where(fin, new, lo[None, :]).sum(1)
            key[~feasible] = -np.inf
            nodes += len(new)
            top = np.argsort(-key, kind="stable")[: beam_width * 2]
            for r in top:
                if key[r] == -np.inf:
                    break
                mk = int(masks[r])
                if mk in chosen:
                    continue
                cand.append((float(key[r]), tuple(sorted((*chosen, mk))), new[r]))
        seen: set[tuple[int, ...]] = set()
        beam = []
        for _, chosen, cur in sorted(cand, key=lambda c: -c[0]):
            if chosen in seen:
                continue
            seen.add(chosen)
            beam.append((chosen, cur))
            if np.isfinite(cur).all():
                complete.append((float(cur.sum()), chosen))
            if len(beam) >= beam_width:
                break
        if not beam:
            break
    if not complete:
        raise DataError("select_beam: found no selection that covers every task (check the scores for -inf)")
    best_val, best = max(complete, key=lambda c: c[0])
    chosen = list(best)
    if local_search:
        rows = {int(mk): r for r, mk in enumerate(pool)}
        tab = {mk: (tp[rows[mk]] if mk in rows else extra[mk]) for mk in chosen}
        chosen, best_val, spent = _polish(sc, chosen, tab, pool, tp, m, best_val)
        nodes += spent
    meta = {
        "budget": int(budget),
        "max_group_size": m,
        "optimal": False,
        "beam_width": int(beam_width),
        "candidates": len(pool),
        "seconds": round(time.perf_counter() - t0, 6),
    }
    return _result(sc, np.array(chosen, dtype=np.int64), "beam", nodes, meta)


def _polish(
    sc: TableScore, chosen: list[int], tab: dict[int, np.ndarray], pool: np.ndarray, tp: np.ndarray, m: int,
    value: float,
) -> tuple[list[int], float, int]:
    """Local search: replace one chosen group by a pool group or by itself with one task added or removed, while
    that raises the total (first the best move for each position in turn; at most 100 passes)."""
    k = len(sc.tasks)
    bits = np.int64(1) << np.arange(k, dtype=np.int64)
    chosen = list(chosen)
    spent = 0
    for _ in range(100):
        improved = False
        for pos in range(len(chosen)):
            others = [tab[c] for q, c in enumerate(chosen) if q != pos]
            base = np.max(others, axis=0) if others else np.full(k, -np.inf)
            flips = chosen[pos] ^ bits
            flips = flips[(flips != 0) & (np.bitwise_count(flips) <= m)]
            masks = np.concatenate([pool, flips])
            rows = np.vstack([tp, _checked_table(sc, flips)]) if len(flips) else tp
            new = np.maximum(base[None, :], rows)
            fin = np.isfinite(new).all(1)
            tot = np.where(fin, np.where(fin[:, None], new, 0.0).sum(1), -np.inf)
            spent += len(rows)
            r = int(np.argmax(tot))
            mk = int(masks[r])
            if tot[r] > value + 1e-12 * max(1.0, abs(value)) and mk not in chosen:
                chosen[pos] = mk
                tab[mk] = rows[r]
                value = float(tot[r])
                improved = True
        if not improved:
            break
    return chosen, value, spent


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


class BeamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beam_width: int = Field(16, ge=1, description="partial selections kept per step")
    max_group_size: int | None = Field(None, ge=1, description="largest group considered (default: all tasks)")
    local_search: bool = Field(True, description="polish the answer with one-group swaps")


@GROUP_SCORES.register("tag", params=TagParams, summary="mean affinity onto each task from its group mates",
                       paper="Fifty et al. 2021, Efficiently Identifying Task Groupings for Multi-Task Learning")
def _tag(params: TagParams, aff: AffinityMatrix) -> TagScore:
    return TagScore(aff, params.singleton_score)


@GROUP_SCORES.register("hoa", summary="higher-order approximation from pairwise networks",
                       paper="Standley et al. 2020, Which Tasks Should Be Learned Together in Multi-task Learning?")
def _hoa(params: NoParams, aff: AffinityMatrix) -> HoaScore:
    return HoaScore(aff)


@GROUPING_SOLVERS.register("exact", params=ExactParams, summary="branch and bound, provably optimal, K <= 16",
                           paper="Standley et al. 2020; Fifty et al. 2021 (network selection)")
def _exact(params: ExactParams, score: TableScore, tasks: Sequence[str], budget: int) -> Grouping:
    return select_exact(score, tasks, budget, params.max_group_size)


@GROUPING_SOLVERS.register("beam", params=BeamParams, summary="greedy candidates + beam selection, any K")
def _beam(params: BeamParams, score: TableScore, tasks: Sequence[str], budget: int) -> Grouping:
    return select_beam(score, tasks, budget, params.beam_width, params.max_group_size, params.local_search)
