"""Pareto fronts and hypervolume of multi-task results, pure functions over float64 arrays.

A *point* is one method's vector of per-task test scores (one objective per task). Everything here works in
**minimise form**: :func:`orient` negates the objectives where higher is better, and :func:`normalise` turns
scores into the signed relative change against a single-task baseline, the per-task term of Δm% (Maninis et al.
2019, as used by Nash-MTL and FAMO), so that tasks of different units can share one hypervolume.

- Dominance (Pareto 1896; e.g. Deb 2001, *Multi-Objective Optimization using Evolutionary Algorithms*, §2.4):
  ``a`` dominates ``b`` when ``a <= b`` in every objective and ``a < b`` in at least one.
- Hypervolume, the S-metric (Zitzler & Thiele 1998, PPSN V; 1999, IEEE TEC 3(4)): the Lebesgue measure of the
  region dominated by the points and bounded by a reference point ``ref``, i.e. of the union of the boxes
  ``[p, ref]``. Exact for any number of objectives: a sweep in 2-D; a sweep over the third objective with the
  2-D front kept in 3-D (the dimension sweep of Fonseca, Paquete & López-Ibáñez 2006, CEC, with a sorted list
  instead of their balanced tree: O(n² log n) rather than O(n log n)); the WFG recursion of While, Bradstreet &
  Barone (2012, IEEE TEC 16(1), eqs. 2-4: exclusive volume = box volume minus the hypervolume of the "limit
  set") above 3-D, exponential in the number of points in the worst case, fast for the tens of methods a
  report shows.

Deliberate differences from the references: a point that is not strictly better than ``ref`` in every
objective contributes nothing (it is dropped, as in pymoo/WFG which assume it away); equal points are all kept by
:func:`non_dominated` (neither dominates the other), and duplicates count once in the hypervolume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

MARGIN = 0.1
"""Default padding of :func:`reference_point` beyond the worst shown point, as a fraction of the range."""


def as_points(points: ArrayLike, name: str = "points") -> Array:
    """``points`` as an (n, d) float64 array of finite values (one row per point, d >= 1); a clear error else."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, 0)
    if p.ndim != 2 or (p.size and p.shape[1] == 0):
        raise ValueError(f"{name} must be a 2-D array (one row per point, one column per objective), got {p.shape}")
    if not np.isfinite(p).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(p))[:, 0]})
        raise ValueError(f"{name} must be finite; rows {bad} are not")
    return p


def orient(values: ArrayLike, higher_is_better: Sequence[bool]) -> Array:
    """Scores (n, d) in minimise form: objectives where higher is better are negated."""
    v = as_points(values, "values")
    sign = _signs(higher_is_better, v.shape[1])
    return v * sign


def normalise(values: ArrayLike, baseline: ArrayLike, higher_is_better: Sequence[bool]) -> Array:
    """Scores (n, d) as the signed relative change against ``baseline`` (d), in minimise form.

    Objective k of point i is ``s_k (v_ik - b_k) / |b_k|`` with ``s_k = -1`` where higher is better: the per-task
    term of Δm% (Maninis et al. 2019) as a fraction, not a percentage; 0 is the baseline, below 0 better. The map is
    increasing in the minimise-form score, so dominance is unchanged."""
    v = as_points(values, "values")
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if b.shape != (v.shape[1],) or not np.isfinite(b).all():
        raise ValueError(f"baseline must hold {v.shape[1]} finite values, got {b.tolist()}")
    zero = [int(k) for k in np.flatnonzero(b == 0)]
    if zero:
        raise ValueError(f"baseline objective(s) {zero} are 0: the relative change is undefined")
    return (v - b) / np.abs(b) * _signs(higher_is_better, v.shape[1])


def _signs(higher_is_better: Sequence[bool], d: int) -> Array:
    if len(higher_is_better) != d:
        raise ValueError(f"need one direction per objective ({d}), got {len(higher_is_better)}")
    return np.where(np.asarray(higher_is_better, dtype=bool), -1.0, 1.0)


def dominates(a: ArrayLike, b: ArrayLike) -> bool:
    """Whether ``a`` Pareto-dominates ``b`` (minimise form): no worse in every objective, better in one."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"points of different lengths: {x.shape} and {y.shape}")
    return bool(np.all(x <= y) and np.any(x < y))


def _dominated_mask(p: Array) -> NDArray[np.bool_]:
    """Row i is True when some row dominates it (pairwise, O(n² d))."""
    if len(p) < 2:
        return np.zeros(len(p), dtype=bool)
    le = (p[:, None, :] <= p[None, :, :]).all(axis=2)  # le[j, i]: p_j <= p_i everywhere
    lt = (p[:, None, :] < p[None, :, :]).any(axis=2)
    return (le & lt).any(axis=0)


def non_dominated(points: ArrayLike) -> list[int]:
    """Indices of the points no other point dominates, in input order (minimise form).

    Equal points do not dominate each other, so all copies of a non-dominated point are kept."""
    p = as_points(points)
    return [int(i) for i in np.flatnonzero(~_dominated_mask(p))]


def reference_point(points: ArrayLike, margin: float = MARGIN, baseline: ArrayLike | None = None) -> Array:
    """The reference point of a report's hypervolume (minimise form).

    With ``baseline`` (e.g. the single-task scores, oriented the same way): the baseline itself, so only points
    better than it on every objective count. Otherwise the worst shown value of each objective plus ``margin``
    times its range, so every non-dominated point has a positive share; where the range is 0 the padding is
    ``margin`` times the worst value's magnitude (``margin`` itself when that is 0)."""
    if baseline is not None:
        return np.asarray(baseline, dtype=np.float64).reshape(-1).copy()
    p = as_points(points)
    if not len(p):
        raise ValueError("a reference point needs at least one point")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    worst, best = p.max(axis=0), p.min(axis=0)
    span = worst - best
    fallback = np.where(worst != 0, np.abs(worst), 1.0)
    return worst + margin * np.where(span > 0, span, fallback)


def hypervolume(points: ArrayLike, ref: ArrayLike) -> float:
    """Exact hypervolume of ``points`` (minimise form) bounded by ``ref``.

    Points not strictly better than ``ref`` in every objective contribute nothing; dominated and repeated points
    add nothing. Cost: O(n log n) for 2 objectives, O(n² log n) for 3, WFG (exponential in n in the worst case)
    above."""
    p = as_points(points)
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    if not len(p):
        return 0.0
    if r.shape != (p.shape[1],) or not np.isfinite(r).all():
        raise ValueError(f"ref must hold {p.shape[1]} finite values, got {r.tolist()}")
    return _hv(_reduce(p[(p < r).all(axis=1)]), r)


def contributions(points: ArrayLike, ref: ArrayLike) -> Array:
    """Each point's exclusive hypervolume: the volume lost when it alone is removed (0 for dominated points and
    for points that have an equal copy)."""
    p = as_points(points)
    total = hypervolume(p, ref)
    return np.array([total - hypervolume(np.delete(p, i, axis=0), ref) for i in range(len(p))], dtype=np.float64)


def _reduce(p: Array) -> Array:
    """The distinct non-dominated rows of ``p``."""
    if len(p) < 2:
        return p
    p = np.unique(p, axis=0)
    return p[~_dominated_mask(p)]


def _hv(p: Array, r: Array) -> float:
    """Hypervolume of distinct non-dominated points, all strictly below ``r``."""
    if not len(p):
        return 0.0
    d = p.shape[1]
    if d == 1:
        return float(r[0] - p[:, 0].min())
    if d == 2:
        return _hv2(p, r)
    if d == 3:
        return _hv3(p, r)
    return _wfg(p, r)


def _hv2(p: Array, r: Array) -> float:
    """2-D sweep: points by the first objective ascending; each point below the best second objective so far adds
    the strip ``[x, r_x] x [y, y_best]``."""
    total, y_best = 0.0, float(r[1])
    for x, y in p[np.lexsort((p[:, 1], p[:, 0]))]:
        if y < y_best:
            total += (float(r[0]) - x) * (y_best - y)
            y_best = float(y)
    return total


def _hv3(p: Array, r: Array) -> float:
    """3-D dimension sweep: points by the third objective ascending; the volume is the sum of the area of the 2-D
    front of the points seen so far times the distance to the next point's third objective (or ``r_z``)."""
    order = p[np.argsort(p[:, 2], kind="stable")]
    front: list[tuple[float, float]] = []  # 2-D front, first objective ascending
    area, total = 0.0, 0.0
    for i, (x, y, _) in enumerate(order):
        if not any(fx <= x and fy <= y for fx, fy in front):
            front = sorted([q for q in front if not (x <= q[0] and y <= q[1])] + [(float(x), float(y))])
            area = _hv2(np.asarray(front), r[:2])
        z_next = order[i + 1, 2] if i + 1 < len(order) else r[2]
        total += area * float(z_next - order[i, 2])
    return total


def _wfg(p: Array, r: Array) -> float:
    """WFG (While et al. 2012, eqs. 2-4): the sum over points of their box volume minus the hypervolume of the
    limit set, the later points each clipped to be no better than the current one (componentwise maximum)."""
    p = p[np.argsort(-p[:, -1], kind="stable")]
    total = 0.0
    for k in range(len(p)):
        box = float(np.prod(r - p[k]))
        limit = _reduce(np.maximum(p[k + 1:], p[k]))
        total += box - _hv(limit, r)
    return total


def worse_than(scores: ArrayLike, baseline: ArrayLike) -> NDArray[np.bool_]:
    """Where each point (minimise form) is strictly worse than ``baseline``: an (n, d) mask. A tie is not worse."""
    p = as_points(scores, "scores")
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if b.shape != (p.shape[1],):
        raise ValueError(f"baseline must hold {p.shape[1]} values, got {b.tolist()}")
    return p > b
