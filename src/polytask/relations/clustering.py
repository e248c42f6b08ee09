"""Scalable task grouping by clustering task features, and picking representative tasks.

* :func:`cluster_tasks` -- STG-MTL (Sherif et al. 2023, "STG-MTL: Scalable Task Grouping for Multi-Task
  Learning Using Data Maps", arXiv:2307.03374): each task is described by its data map (per sample: mean
  confidence of the gold label and its variability across epochs, flattened into one vector per task); k-means
  over the tasks gives centroids, and the fuzzy c-means membership equation (Bezdek 1981) turns distances to the
  centroids into soft memberships, u_tc = d_tc^(-2/(m-1)) / sum_c' d_tc'^(-2/(m-1)), with fuzziness index
  m = 1.07 by default -- the paper's default mode ("task based, fuzzy from k-means") in its official code.
* :func:`select_representatives` -- BenTo (Zhao et al. 2024, "BenTo: Benchmark Task Reduction with In-Context
  Transferability", ICLR 2025): choose k tasks that best cover all tasks under a transferability similarity by
  maximising the facility-location function F(S) = sum_j max_{i in S} sim(i, j) greedily (monotone submodular,
  so greedy is within 1 - 1/e of the optimum; Nemhauser et al. 1978), with Minoux's lazy evaluations.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from polytask.errors import ConfigError, DataError
from polytask.relations.affinity import _jsonable
from polytask.relations.grouping import Grouping

#: The official STG-MTL code's default fuzziness index m.
STG_FUZZINESS = 1.07


@dataclass
class TaskClusters:
    """Hard groups (one per cluster, by largest membership) and the K x n_groups soft membership matrix."""

    groups: list[list[str]]
    assignment: dict[str, int]
    membership: np.ndarray
    centroids: np.ndarray
    tasks: list[str]
    inertia: float
    solver: str = "stg-mtl"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_grouping(self) -> Grouping:
        """As a :class:`Grouping` (per-task score = the task's membership in its own cluster)."""
        per = {t: float(self.membership[i, self.assignment[t]]) for i, t in enumerate(self.tasks)}
        return Grouping([list(g) for g in self.groups], dict(self.assignment), float(sum(per.values())), per,
                        self.solver, 0, {**self.meta, "membership": self.membership.tolist()})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the clusters: groups, assignment, soft membership, inertia (NaN/inf become ``null``)."""
        return {
            "groups": [list(g) for g in self.groups],
            "assignment": dict(self.assignment),
            "tasks": list(self.tasks),
            "membership": _jsonable(self.membership),
            "inertia": _jsonable(float(self.inertia)),
            "solver": self.solver,
            "meta": _jsonable(self.meta),
        }


def fuzzy_membership(features: np.ndarray, centroids: np.ndarray, fuzziness: float = STG_FUZZINESS) -> np.ndarray:
    """Fuzzy c-means memberships of each row to each centroid (Bezdek 1981; STG-MTL's fuzzification step).

    u_tc = d_tc^(-2/(m-1)) / sum_c' d_tc'^(-2/(m-1)) with d the Euclidean distance (+1e-10, as in the official
    code); computed in log space, since m close to 1 makes the exponent large (-28.6 at m = 1.07). Rows sum to 1;
    m -> 1 approaches hard k-means, m -> inf uniform memberships.
    """
    if not fuzziness > 1.0:
        raise ConfigError(f"fuzzy membership: the fuzziness index m must be > 1, got {fuzziness}")
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    d2 = np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :], 0.0)
    d = np.sqrt(d2) + 1e-10
    logits = -(2.0 / (fuzziness - 1.0)) * np.log(d)
    logits -= logits.max(1, keepdims=True)
    u = np.exp(logits)
    return u / u.sum(1, keepdims=True)


def cluster_tasks(
    features: np.ndarray,
    tasks: Sequence[str],
    n_groups: int,
    seed: int = 0,
    fuzzy: bool = True,
    fuzziness: float = STG_FUZZINESS,
    n_init: int = 10,
    standardize: bool = False,
) -> TaskClusters:
    """STG-MTL task grouping: k-means over per-task feature vectors, then (``fuzzy``) soft memberships.

    ``features`` is K x F: one row per task (e.g. its data map, per-sample mean confidence and variability,
    flattened). Each task's hard group is its largest membership; with ``fuzzy=False`` memberships are one-hot.
    ``standardize`` z-scores each feature column first (off in the paper). Deterministic given ``seed``.
    """
    t0 = time.perf_counter()
    x = np.asarray(features, dtype=np.float64)
    tasks = [str(t) for t in tasks]
    if x.ndim != 2:
        raise DataError(f"cluster_tasks: features must be K x F, got shape {x.shape}")
    if x.shape[0] != len(tasks):
        raise DataError(f"cluster_tasks: {x.shape[0]} feature rows for {len(tasks)} tasks")
    if len(set(tasks)) != len(tasks):
        raise DataError("cluster_tasks: task names must be unique")
    if not np.isfinite(x).all():
        rows = sorted({tasks[i] for i in np.argwhere(~np.isfinite(x))[:, 0]})
        raise DataError(f"cluster_tasks: features of tasks {rows[:5]} contain NaN or inf")
    k = len(tasks)
    if not 1 <= n_groups <= k:
        raise ConfigError(f"cluster_tasks: n_groups must be between 1 and the number of tasks ({k}), got {n_groups}")
    if standardize:
        sd = x.std(0)
        x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    km = KMeans(n_clusters=n_groups, n_init=n_init, random_state=seed).fit(x)
    centroids = km.cluster_centers_
    if fuzzy:
        u = fuzzy_membership(x, centroids, fuzziness)
    else:
        u = np.zeros((k, n_groups))
        u[np.arange(k), km.labels_] = 1.0
    hard = u.argmax(1)
    groups = [[tasks[i] for i in np.flatnonzero(hard == c)] for c in range(n_groups)]
    meta = {"n_groups": n_groups, "seed": seed, "fuzzy": fuzzy, "fuzziness": fuzziness if fuzzy else None,
            "standardize": standardize, "seconds": round(time.perf_counter() - t0, 6),
            "empty_groups": int(sum(1 for g in groups if not g))}
    return TaskClusters(groups, {t: int(hard[i]) for i, t in enumerate(tasks)}, u, centroids, tasks,
                        float(km.inertia_), "stg-mtl", meta)


def facility_location(similarity: np.ndarray, selected: Sequence[int]) -> float:
    """F(S) = sum_j max_{i in S} sim(i, j), with the empty set at sum_j min_i sim(i, j) (so F is monotone)."""
    s = np.asarray(similarity, dtype=np.float64)
    if not len(selected):
        return float(s.min(0).sum())
    return float(s[list(selected)].max(0).sum())


def select_representatives(similarity: np.ndarray, k: int, lazy: bool = True) -> list[int]:
    """BenTo's task reduction: k tasks (row indices) greedily maximising the facility location F(S).

    ``similarity[i, j]`` is how well task i stands in for (transfers to) task j. Gains are taken against the
    floor ``min_i sim(i, j)`` so F is monotone submodular for any real similarities. ``lazy`` uses Minoux's
    priority queue of stale gains (a popped gain is recomputed; if it still beats the next bound it is the true
    maximum), which picks exactly what plain greedy picks (ties: the lower index) with far fewer evaluations.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise DataError(f"select_representatives: similarity must be K x K, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError("select_representatives: similarity has NaN or inf entries")
    n = s.shape[0]
    if not 0 <= k <= n:
        raise ConfigError(f"select_representatives: k must be between 0 and {n}, got {k}")
    cur = s.min(0)
    chosen: list[int] = []

    def gain(i: int) -> float:
        return float(np.maximum(s[i] - cur, 0.0).sum())

    if not lazy:
        for _ in range(k):
            gains = np.maximum(s - cur[None, :], 0.0).sum(1)
            gains[chosen] = -math.inf
            i = int(np.argmax(gains))
            chosen.append(i)
            cur = np.maximum(cur, s[i])
        return chosen
    first = np.maximum(s - cur[None, :], 0.0).sum(1)  # bitwise the same sums as gain(i), row by row
    heap = [(-float(g), i) for i, g in enumerate(first)]
    heapq.heapify(heap)
    while len(chosen) < k:
        _, i = heapq.heappop(heap)
        g = gain(i)
        if not heap or (-g, i) <= heap[0]:
            chosen.append(i)
            cur = np.maximum(cur, s[i])
        else:
            heapq.heappush(heap, (-g, i))
    return chosen
