"""The affinity matrix: what every relation estimator returns and every grouping solver reads.

Entry ``[i, j]`` is the effect of task ``i`` ON task ``j`` ("i -> j"): rows are sources, columns targets. The
matrix may be asymmetric; whether the diagonal means something (a self-lookahead, a single-task loss) or is NaN
is up to the estimator. ``higher_is_better`` says which way the numbers point (affinities and transferability
scores: higher; pairwise losses: lower).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polytask.errors import DataError
from polytask.io import atomic_write_json

FORMAT = "polytask.affinity/1"


@dataclass
class AffinityMatrix:
    """A K x K task-relation matrix, ``[i, j]`` = effect of task i on task j, with the estimator and its cost."""

    matrix: np.ndarray
    tasks: list[str]
    estimator: str
    cost: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            m = np.array(self.matrix, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"affinity matrix ({self.estimator}): entries must be numbers ({e})") from None
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise DataError(f"affinity matrix ({self.estimator}): must be square K x K, got shape {m.shape}")
        self.tasks = [str(t) for t in self.tasks]
        if len(self.tasks) != m.shape[0]:
            raise DataError(
                f"affinity matrix ({self.estimator}): {len(self.tasks)} task names for a {m.shape[0]} x "
                f"{m.shape[1]} matrix"
            )
        dupes = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dupes:
            raise DataError(f"affinity matrix ({self.estimator}): task names must be unique, repeated: {dupes}")
        off = ~np.eye(m.shape[0], dtype=bool)
        bad = np.argwhere(off & ~np.isfinite(m))
        if len(bad):
            i, j = bad[0]
            raise DataError(
                f"affinity matrix ({self.estimator}): off-diagonal entries must be finite; "
                f"[{self.tasks[i]!r} -> {self.tasks[j]!r}] is {m[i, j]} ({len(bad)} such entries)"
            )
        if np.isinf(np.diag(m)).any():
            raise DataError(f"affinity matrix ({self.estimator}): the diagonal may be NaN but not infinite")
        self.matrix = m
        self.cost = dict(self.cost)
        self.meta = dict(self.meta)

    @property
    def k(self) -> int:
        """The number of tasks (the matrix is k x k)."""
        return len(self.tasks)

    def index(self, task: str) -> int:
        """The row/column of ``task``; a clear error naming the known tasks otherwise."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise DataError(f"affinity matrix ({self.estimator}): unknown task {task!r}; known: {self.tasks}") from None

    def oriented(self) -> np.ndarray:
        """The matrix with higher always better (negated when ``higher_is_better`` is False)."""
        return self.matrix.copy() if self.higher_is_better else -self.matrix

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN entries become ``null``."""
        rows = [[None if math.isnan(v) else float(v) for v in row] for row in self.matrix]
        return {
            "format": FORMAT,
            "estimator": self.estimator,
            "tasks": list(self.tasks),
            "matrix": rows,
            "higher_is_better": self.higher_is_better,
            "cost": _jsonable(self.cost),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> AffinityMatrix:
        """Inverse of :meth:`to_json` (accepts the dict or its JSON text); ``null`` entries become NaN."""
        if isinstance(data, str):
            data = json.loads(data)
        missing = [k for k in ("estimator", "tasks", "matrix") if k not in data]
        if missing:
            raise DataError(f"affinity JSON is missing key(s) {missing}")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise DataError(f"affinity JSON has format {fmt!r}; this version reads {FORMAT!r}")
        rows = [[math.nan if v is None else v for v in row] for row in data["matrix"]]
        return cls(
            matrix=np.array(rows, dtype=np.float64).reshape(len(rows), -1) if rows else np.zeros((0, 0)),
            tasks=list(data["tasks"]),
            estimator=str(data["estimator"]),
            cost=dict(data.get("cost", {})),
            higher_is_better=bool(data.get("higher_is_better", True)),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_json()`` atomically (a reader sees the old file or the whole new one)."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AffinityMatrix:
        """Read a matrix written by :meth:`save`; a missing or malformed file is a DataError naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"affinity file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise DataError(f"affinity file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_json(data)

    def symmetric(self) -> AffinityMatrix:
        """(M + M^T) / 2 off the diagonal, the diagonal kept: for solvers and plots that want one number per pair."""
        m = (self.matrix + self.matrix.T) / 2.0
        np.fill_diagonal(m, np.diag(self.matrix))
        return AffinityMatrix(m, list(self.tasks), self.estimator, dict(self.cost), self.higher_is_better,
                              {**self.meta, "symmetrized": True})

    def subset(self, tasks: list[str]) -> AffinityMatrix:
        """The matrix restricted to ``tasks``, in that order."""
        idx = [self.index(t) for t in tasks]
        if len(set(idx)) != len(idx):
            raise DataError(f"affinity subset: repeated task names in {tasks}")
        m = self.matrix[np.ix_(idx, idx)]
        return AffinityMatrix(m, list(tasks), self.estimator, dict(self.cost), self.higher_is_better, dict(self.meta))

    def spearman(self, other: AffinityMatrix) -> float:
        """Spearman rank correlation of the off-diagonal entries with ``other`` (ties get average ranks).

        Both matrices are first oriented so that higher is better, so a loss matrix and an affinity matrix that
        agree on which pairs are good correlate positively. ``other`` is reordered to this matrix's tasks; NaN
        when either side is constant (the correlation is undefined).
        """
        if set(other.tasks) != set(self.tasks):
            raise DataError(
                f"spearman: the matrices cover different tasks ({sorted(set(self.tasks) ^ set(other.tasks))} "
                f"in only one)"
            )
        if self.k < 2:
            raise DataError("spearman: needs at least 2 tasks (2 off-diagonal entries)")
        o = other.subset(self.tasks)
        off = ~np.eye(self.k, dtype=bool)
        return spearman_rho(self.oriented()[off], o.oriented()[off])


def rankdata_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sx) != 0) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman_rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho = Pearson correlation of average ranks (Spearman 1904); NaN if either side is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise DataError(f"spearman: {a.size} vs {b.size} values")
    ra = rankdata_average(a) - (len(a) + 1) / 2.0
    rb = rankdata_average(b) - (len(b) + 1) / 2.0
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / den) if den > 0 else math.nan


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays to plain Python; NaN/inf floats to None, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
