"""Small K x K solvers shared by the Gramian aggregators.

Everything here works on float64 numpy arrays of size K <= ~10: for such sizes numpy is an order of magnitude
faster than torch (no dispatcher, no autograd bookkeeping). Each solver is iteration-bounded and its
tolerances are relative: callers pass a trace-normalised Gramian (``normalize``), and every optimality test
compares a task's multiplier with the rounding error of that very task's terms (``kkt_tol``), so a task whose
gradient is 1e-6 of the largest one is solved as accurately as the largest one (an absolute tolerance would
stop the solvers short when the task-gradient norms are spread).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

REL_TOL = 1e-12
"""Relative tolerance of the KKT / optimality tests (about 5000 float64 roundings)."""

RIDGE = 1e-10
"""Relative ridge added to the diagonal of the Gramian (G_ii -> (1 + RIDGE) G_ii) by the solvers whose weights
are unbounded (Nash-MTL / FairGrad; the dual-cone projections use ``CONE_RIDGE``): every face problem of non-zero
tasks becomes strictly convex, so duplicate or linearly dependent tasks get small weights instead of huge
cancelling ones (and Nash-MTL a solution where no positive one exists), at a cost of ~1e-10 relative in each
task's KKT condition. Simplex-bounded problems (MGDA, CAGrad) need none."""


CONE_RIDGE = 1e-12
"""The ridge of the dual-cone projections: its KKT cost, a conflict of ~1e-12 |g_i|^2 v_i, stays below what the
non-conflicting guarantee is checked to (the scaled face solves keep these systems accurate at this ridge)."""


def ridged(g: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """``g`` with its diagonal multiplied by ``1 + ridge``."""
    return g + ridge * np.diag(np.diag(g))


def normalize(g: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetrise ``g`` and divide it by ``trace(g) / K``; the scale is 0.0 (and the matrix all zeros) when
    the Gramian is zero, so callers can return a zero direction."""
    g = 0.5 * (g + g.T)
    scale = float(np.trace(g)) / len(g)
    if not scale > 0.0:
        return np.zeros_like(g), 0.0
    return g / scale, scale


COSINE_RCOND = 1e-12
"""Eigenvalues of a cosine matrix below this fraction of its largest are treated as zero: above the rounding of
a float64 Gramian (~1e-14) and of float32 gradients' own ~1e-7 errors (squared), below any real dependence."""


def equal_cosine(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(c, norms)`` with c = C^+ 1 on the non-zero tasks (0 on zero-gradient tasks), C = N G N the cosine
    matrix, N = diag(1/|g_i|): y = sum_i c_i u_i (u_i = g_i / |g_i|) is the minimum-norm least-squares
    solution of u_i . y = 1 for all i, the direction with equal cosine to every task (IMTL-G, ConFIG) when it
    exists. C has unit diagonal, so its pseudo-inverse (``COSINE_RCOND``) is as accurate for a task with a
    tiny gradient as for a large one. c = 0 exactly when sum_i u_i = 0 (then 0 is in the convex hull), up to
    the directions the cutoff drops."""
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    c = np.zeros(len(g))
    live = np.flatnonzero(norms > 0)
    if len(live):
        n = norms[live]
        cos = g[np.ix_(live, live)] / np.outer(n, n)
        lam, vec = np.linalg.eigh(0.5 * (cos + cos.T))
        keep = lam > COSINE_RCOND * lam.max()
        c[live] = vec[:, keep] @ ((vec[:, keep].T @ np.ones(len(live))) / lam[keep])
    return c, norms


def kkt_tol(g: np.ndarray, b: np.ndarray, x: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Per-task tolerance of a multiplier (G x + b)_j: ``REL_TOL`` times the size of its terms,
    |g_j| (sum_i |x_i| |g_i| + 1e-3 max|x| min_{x_i != 0} |g_i|) + |b_j| (batched over the rows of ``b`` and
    ``x``): relative to what rounding can resolve for task j, not to the largest task. The second term is the
    rounding of the weights themselves: the face solves (``simplex_face_solve``) keep each weight's relative
    accuracy and put the constraint's absolute rounding (~1e-15) on the smallest-norm task of the support.
    ``n``: the gradient norms sqrt(diag(G)), when the caller has them."""
    n = np.sqrt(np.maximum(np.diag(g), 0.0)) if n is None else n
    ax = np.abs(x)
    smallest = np.where(ax > 0, n, np.inf).min(axis=-1)
    smallest = np.where(smallest < np.inf, smallest, 0.0)
    weights = ax @ n + 1e-3 * ax.max(axis=-1) * smallest
    return REL_TOL * (n * weights[..., None] + np.abs(b))


def lin_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``a x = b``; the minimum-norm least-squares solution when ``a`` is singular (duplicate tasks)."""
    try:
        x = np.linalg.solve(a, b)
        if np.isfinite(x).all():
            return x
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(a, b, rcond=None)[0]


def scaled_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``lin_solve`` of the symmetric system ``a x = b`` after scaling it to a unit diagonal (Jacobi
    equilibration): with gradient norms spread over many orders the unscaled LU loses the small tasks' entries
    below the large ones' rounding, the scaled one keeps each entry's relative accuracy."""
    root = np.sqrt(np.abs(np.diag(a)))
    d = 1.0 / np.where(root > 0, root, 1.0)
    dd = d[:, None] if b.ndim == 2 else d
    return dd * lin_solve(a * d[:, None] * d[None, :], dd * b)


def simplex_face_solve(hf: np.ndarray, rhs: np.ndarray, total: np.ndarray | float) -> np.ndarray:
    """Minimiser of 1/2 y^T H y - rhs^T y subject to sum(y) = total (per column of ``rhs`` when 2-D).

    Null-space method: the smallest-norm task p carries the constraint, y_p = total - sum of the others, and
    the rest solve the reduced system R y_r = (rhs_r - rhs_p) - total (H_rp - H_pp) with
    R_ij = (g_i - g_p) . (g_j - g_p), equilibrated (``scaled_solve``). Unlike the bordered KKT matrix
    [[H, 1], [1^T, 0]], whose unit border swamps the Gram entries of tiny gradients, this keeps them exact.
    Minimum-norm (scaled) when the face is singular (duplicate or dependent tasks)."""
    m = len(hf)
    rhs2 = rhs.reshape(m, -1)
    tot = np.broadcast_to(np.asarray(total, dtype=float), (rhs2.shape[1],))
    piv = int(np.argmin(np.diag(hf)))
    rest = np.delete(np.arange(m), piv)
    y = np.zeros((m, rhs2.shape[1]))
    if m > 1:
        col = hf[rest, piv]
        red = hf[rest][:, rest] - col[:, None] - col[None, :] + hf[piv, piv]
        y[rest] = scaled_solve(red, (rhs2[rest] - rhs2[piv]) - (col - hf[piv, piv])[:, None] * tot[None, :])
    y[piv] = tot - y[rest].sum(axis=0)
    return y.reshape(rhs.shape)


def _face_solve(h: np.ndarray, rhs: np.ndarray, idx: np.ndarray, simplex: bool, total: float) -> np.ndarray:
    """Minimiser of 1/2 y^T H_ff y - rhs^T y on face ``idx`` (with sum(y) = total on the simplex)."""
    hf = h[np.ix_(idx, idx)]
    if not simplex:
        return scaled_solve(hf, rhs[idx])
    return simplex_face_solve(hf, rhs[idx], total)


def active_set_qp(
    h: np.ndarray, b: np.ndarray, simplex: bool, x0: np.ndarray | None = None, max_iter: int | None = None
) -> np.ndarray:
    """argmin_x 1/2 x^T h x + b^T x s.t. x >= 0 (and sum(x) = 1 when ``simplex``), for PSD ``h``.

    A primal active-set method (Nocedal & Wright 2006, Alg. 16.3): on the current face take the step to the
    face minimiser (minimum-norm when the face is singular), stop at a blocking bound, and free the index
    with the most negative multiplier once the face is optimal. ``b`` must lie in the range of ``h`` on every
    face, which holds for all the aggregators' problems (b = h u), so every face problem is bounded.
    ``x0`` warm-starts from a point (clipped to the feasible set). Exact up to linear algebra in at most
    ``max_iter`` (default 6K + 10) steps.
    """
    k = len(b)
    x = np.zeros(k) if x0 is None else np.maximum(x0, 0.0)
    x[x <= 1e-15 * x.max(initial=0.0)] = 0.0  # rounding-level weights of a warm start are noise: start without
    if simplex and not x.sum() > 0:
        x[int(np.argmin(0.5 * np.diag(h) + b))] = 1.0
    if simplex:
        x = x / x.sum()
    free = x > 0
    at_face_optimum = x0 is None or not free.any()
    for _ in range(max_iter or 6 * k + 10):
        grad = h @ x + b
        if at_face_optimum:
            tol = kkt_tol(h, b, x)
            lam = grad - (float(grad[free].sum()) / int(free.sum()) if simplex else 0.0)
            if simplex and free.any():  # the multiplier nu = mean of the free gradients carries their rounding
                tol = tol + tol[free].max()
            lam[free] = np.inf
            j = int(np.argmin(lam + tol))
            if lam[j] >= -tol[j]:
                break
            free[j] = True
        idx = np.flatnonzero(free)
        p = _face_solve(h, -grad, idx, simplex, 0.0)
        xf = x[idx]
        shrinking = p < 0
        t, block = 1.0, -1
        if shrinking.any():
            ratios = xf[shrinking] / -p[shrinking]
            r = int(np.argmin(ratios))
            if ratios[r] < 1.0:
                t, block = float(ratios[r]), int(idx[shrinking][r])
        moved = xf + t * p
        gone = moved <= 1e-14 * xf  # cancelled to rounding: on the boundary
        x[idx] = np.where(gone, 0.0, moved)
        free[idx[gone]] = False
        if block >= 0:
            x[block], free[block] = 0.0, False
        at_face_optimum = block < 0
    if simplex:
        x = x / x.sum()
    return x


def _pdas_systems(g: np.ndarray, b: np.ndarray, active: np.ndarray, simplex: bool) -> tuple[np.ndarray, np.ndarray]:
    """Batched linear systems of one primal-dual active-set step: free rows keep (G x + b)_j (- nu) = 0,
    active rows fix x_j = 0; on the simplex an extra unknown nu and the row sum(x) = 1."""
    n, k = b.shape
    m = k + 1 if simplex else k
    mat = np.zeros((n, m, m))
    rhs = np.zeros((n, m))
    mat[:, :k, :k] = np.where(active[:, :, None], np.eye(k), g)
    rhs[:, :k] = np.where(active, 0.0, -b)
    if simplex:
        mat[:, :k, k] = np.where(active, 0.0, -1.0)
        mat[:, k, :k] = 1.0
        rhs[:, k] = 1.0
    return mat, rhs


def _batched_solve(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve every system of the batch; singular ones (duplicate tasks) by minimum-norm least squares."""
    try:
        x = np.linalg.solve(mat, rhs[..., None])[..., 0]
        if np.isfinite(x).all():
            return x
    except np.linalg.LinAlgError:
        pass
    return np.stack([lin_solve(a, r) for a, r in zip(mat, rhs, strict=True)])


def qp_batch(g: np.ndarray, b: np.ndarray, simplex: bool, active: np.ndarray | None = None) -> np.ndarray:
    """Row-wise argmin_x 1/2 x^T G x + b_n^T x s.t. x >= 0 (and sum(x) = 1 when ``simplex``), for PSD G.

    A batched primal-dual active-set method (Hintermueller, Ito & Kunisch 2002) updates every problem's active
    set with one batched K x K solve per sweep; once a problem's active set stops changing it satisfies the KKT
    conditions (free x >= 0 and active multipliers >= 0, to ``REL_TOL``). Problems whose active set cycles or
    is still moving after a few sweeps, and every result that fails the full KKT test (``kkt_holds``: the
    batched LU is unscaled and loses tiny tasks when the norms are spread), are finished by the primal
    active-set method (``active_set_qp``, equilibrated face solves), warm-started from their last iterate.
    """
    n, k = b.shape
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    if active is None:
        active = np.zeros((n, k), dtype=bool) if simplex else b >= -kkt_tol(g, b, np.zeros((n, k)), norms)
    active, previous = active.copy(), None
    x = np.zeros((n, k))
    rows = np.arange(n)
    stuck = []
    for _ in range(min(k + 3, 6)):
        bb = b if len(rows) == n else b[rows]
        if simplex:
            empty = active.all(axis=1)
            if empty.any():
                active[empty, np.argmin(bb[empty], axis=1)] = False
        sol = _batched_solve(*_pdas_systems(g, bb, active, simplex))
        xs = sol[:, :k]
        mu = xs @ g + bb - (sol[:, k:] if simplex else 0.0)
        tol = kkt_tol(g, bb, xs, norms)
        if simplex:  # nu is solved from the free rows and carries their rounding
            tol = tol + np.where(active, 0.0, tol).max(axis=1, keepdims=True)
        xtol = REL_TOL * np.maximum(1.0, np.abs(xs).max(axis=1, keepdims=True))
        new = np.where(active, mu >= -tol, xs < -xtol)
        x[rows] = np.where(active, 0.0, np.maximum(xs, 0.0))
        left = (new != active).any(axis=1)
        if previous is not None:
            cycle = left & (new == previous).all(axis=1)
            stuck.extend(rows[cycle])
            left &= ~cycle
        if not left.any():
            break
        rows, previous, active = rows[left], active[left], new[left]
    else:
        stuck.extend(rows)
    x[x <= 1e-13 * np.abs(x).max(axis=1, keepdims=True)] = 0.0  # the unscaled LU's absolute rounding
    if simplex:
        x = x / x.sum(axis=1, keepdims=True)
    stuck = sorted(set(stuck) | set(np.flatnonzero(~kkt_holds(g, b, x, simplex, norms))))
    for i in stuck:
        x[i] = active_set_qp(g, b[i], simplex, x0=x[i])
    return x


def kkt_holds(g: np.ndarray, b: np.ndarray, x: np.ndarray, simplex: bool, n: np.ndarray | None = None
              ) -> np.ndarray:
    """Row-wise test of the KKT conditions of min 1/2 x^T G x + b^T x s.t. x >= 0 (and sum(x) = 1): the
    gradient is equal (to nu on the simplex, 0 otherwise) on the support and not below it off the support, each
    task to its own rounding tolerance (``kkt_tol``). The batched solves use an unscaled LU, which is checked
    here rather than trusted."""
    free = x > 0
    grad = x @ g + b
    tol = kkt_tol(g, b, x, n)
    if simplex:
        count = np.maximum(free.sum(axis=1, keepdims=True), 1)
        grad -= (grad * free).sum(axis=1, keepdims=True) / count
        tol += (tol * free).max(axis=1, keepdims=True)
    ok = np.where(free, np.abs(grad) <= tol, grad >= -tol)
    return ok.all(axis=1) & (x >= 0).all(axis=1)


def min_norm_simplex(g: np.ndarray) -> np.ndarray:
    """Weights of the minimum-norm point of the convex hull of the gradients: argmin_{w in simplex} w^T G w."""
    return qp_batch(g, np.zeros((1, len(g))), simplex=True)[0]


def dual_cone_weights(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise weights v >= u_n of the projection of J^T u_n onto the dual cone {x : J x >= 0} of J's rows.

    Quinton & Rey (2024), Prop. 1: the projection is J^T v with v = argmin_{v >= u} v^T G v, i.e. v = u + l
    where l solves the non-negative QP min_{l >= 0} 1/2 l^T G l + (G u)^T l.
    """
    h = ridged(g, CONE_RIDGE)
    return u + qp_batch(h, u @ h, simplex=False)


def _affine_path(g: np.ndarray, a: np.ndarray, r: float, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On support ``idx`` the simplex minimiser of (s/r) a^T w + 1/2 w^T G w is p + s m; return (p, m)."""
    rhs = np.zeros((len(idx), 2))
    rhs[:, 1] = -a[idx] / r
    sol = simplex_face_solve(g[np.ix_(idx, idx)], rhs, np.array([1.0, 0.0]))
    p, mm = np.zeros(len(a)), np.zeros(len(a))
    p[idx], mm[idx] = sol[:, 0], sol[:, 1]
    return p, mm


def cagrad_kkt(g: np.ndarray, r: float, w: np.ndarray, u: np.ndarray) -> tuple[float, float]:
    """The KKT residual of the CAGrad dual at simplex weights w and update weights u, with its rounding
    tolerance: ``(gap, tol)``.

    With d = g0 + r J^T u (|J^T u| <= 1, so d lies in the ball), task i improves by (a + r G u)_i, a = G 1/K;
    the residual is the duality gap a . w + r |g_w| - min_i (a + r G u)_i >= 0 between the dual value at w
    and the worst-task improvement of d. It is zero exactly when both are optimal (then d solves
    max_d min_i g_i . d s.t. |d - g0| <= r), and inf when w is off the simplex or d outside the ball. ``tol``
    is per task, relative to what rounding can resolve for the tasks that decide the gap however spread the
    gradient norms are: 1e-10 (100 ``REL_TOL``: weights solved near a cancellation carry cond x eps) of
    |g_i| (mean_j |g_j| + r sum_j |u_j| |g_j|), as in ``kkt_tol``, plus the rounding of |g_w| = sqrt(w^T G w)
    (whose relative error grows as |g_w| -> 0).
    """
    k = len(g)
    n = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = g.sum(axis=1) / k
    gu = g @ u
    improvement = a + r * gu
    worst = int(np.argmin(improvement))
    au = np.abs(u)
    un = float(au @ n)
    if (w < 0).any() or float(u @ gu) - 1.0 > REL_TOL * max(1.0, un * un):
        return math.inf, 0.0
    weights = un + 1e-3 * float(au.max()) * float(n[u != 0].min(initial=0.0))
    size = (100.0 * REL_TOL * (float(n.sum()) / k + r * weights)) * n
    q = max(float(w @ g @ w), 0.0)
    wn = float(w @ n)
    norm_rounding = r * (math.sqrt(q + 1e-14 * wn * wn) - math.sqrt(q))
    gap = float(a @ w) + r * math.sqrt(q) - float(improvement[worst])
    return gap, float(w @ size + size[worst]) + norm_rounding


def cagrad_dual(g: np.ndarray, r: float, max_iter: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """The CAGrad dual optimum w and the update weights u, d = g0 + r J^T u (Liu et al. 2021, Eq. 4).

    The dual is min_{w in simplex} a^T w + r ||g_w|| with a = G 1/K. Writing ||g_w|| = min_{s>0} (q/(2s) + s/2)
    (q = w^T G w) makes it jointly convex in (w, s); for fixed s the minimiser w(s) solves a simplex QP and
    the optimal s satisfies s^2 = q(w(s)) (the s-derivative 1 - q/s^2 is monotone, so the iteration keeps a
    bracket). On a fixed support w(s) = p + s m is affine, so that equation is a quadratic in s: we solve it
    exactly, re-solve the QP at the new root (bisection when the root leaves the bracket), and stop once the
    KKT residual (duality gap, ``cagrad_kkt``) is below its rounding tolerance: the result is a verified
    optimum, and J^T u = g_w / ||g_w||. If the dual optimum has g_w = 0 (zero lies in the convex hull and the
    ball reaches the dual cone {d : J d >= 0}), every d in ball and cone is optimal and u gives the one closest
    to g0, the projection of g0 onto the cone (||J^T u|| <= 1), verified the same way. Should the certificate not
    be reached in ``max_iter`` QP solves, the iterate with the smallest residual is returned with a
    ``RuntimeWarning`` that gives the residual.
    """
    k = len(g)
    a = g.sum(axis=1) / k
    n = np.sqrt(np.maximum(np.diag(g), 0.0))
    lo, hi = 0.0, math.inf
    s = math.sqrt(max(float(a.sum()) / k, REL_TOL * (float(n.sum()) / k) ** 2))
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None

    def certified(w: np.ndarray, u: np.ndarray) -> bool:
        nonlocal best
        gap, tol = cagrad_kkt(g, r, w, u)
        if best is None or gap - tol < best[0] - best[1]:
            best = (gap, tol, w, u)
        return gap <= tol

    projection: list[np.ndarray] = []

    def onto_cone() -> np.ndarray:
        """u for the projection J^T v of g0 onto the dual cone {d : J d >= 0}, v = argmin_{v >= 1/K} v^T G v."""
        if not projection:
            u0 = np.full(k, 1.0 / k)
            projection.append(qp_batch(g, (u0 @ g)[None], simplex=False)[0] / r)
        return projection[0]

    support = None
    for _ in range(max_iter):
        w = qp_batch(g, (s / r) * a[None], simplex=True, active=None if support is None else ~support[None])[0]
        support = w > 0
        q = float(w @ g @ w)
        psi = 1.0 - q / (s * s)
        if q > REL_TOL * float(w @ n) ** 2:
            if certified(w, w / math.sqrt(q)):
                break
        elif psi > 0 and certified(w, onto_cone()):  # g_w = 0: see the branch below
            break
        lo, hi = (s, hi) if psi < 0 else (lo, s)
        p, m = _affine_path(g, a, r, np.flatnonzero(support))
        big_a, big_b, big_c = float(p @ g @ p), float(p @ g @ m), float(m @ g @ m)
        # g_p = 0 with p on the simplex: if the ball meets the dual cone {d : J d >= 0}, every d in it is
        # optimal (worst-task improvement 0); take the one closest to g0, the projection of g0 onto the cone
        zero_in_hull = big_a <= REL_TOL * float(np.abs(p) @ n) ** 2 and big_c <= 1.0 and (p >= 0).all()
        if zero_in_hull and psi > 0 and certified(p, onto_cone()):
            break
        roots = [x for x in _positive_roots(1.0 - big_c, -2.0 * big_b, -big_a) if lo < x < hi]
        if roots:
            s_new = min(roots, key=lambda x: abs(x - s))
        else:
            s_new = 2.0 * s if math.isinf(hi) else (0.5 * (lo + hi) if lo == 0.0 else math.sqrt(lo * hi))
        if abs(s_new - s) <= 1e-15 * s:
            s_new = 0.5 * (lo + hi) if lo > 0.0 and not math.isinf(hi) else s_new
            if abs(s_new - s) <= 1e-15 * s:
                break
        s = s_new
    if best is None:  # g_w = 0 on every iterate and no limit direction: the dual optimum has g_w = 0
        return w, np.zeros(k)
    gap, tol, w, u = best
    if gap > tol:
        warnings.warn(f"CAGrad dual: KKT residual {gap:.3g} above its tolerance {tol:.3g} after {max_iter} "
                      "iterations; using the best iterate", RuntimeWarning, stacklevel=2)
    return w, u


def _positive_roots(qa: float, qb: float, qc: float) -> list[float]:
    """Positive real roots of qa x^2 + qb x + qc = 0 (linear when qa is ~0)."""
    if abs(qa) <= 1e-14 * max(abs(qb), abs(qc), 1.0):
        return [-qc / qb] if qb != 0.0 and -qc / qb > 0 else []
    disc = qb * qb - 4.0 * qa * qc
    if disc < 0:
        return []
    sq = math.sqrt(disc)
    q = -0.5 * (qb + math.copysign(sq, qb))
    roots = [q / qa] + ([qc / q] if q != 0.0 else [])
    return [x for x in roots if x > 0]


def power_fixed_point(g: np.ndarray, p: float, max_iter: int = 100) -> np.ndarray:
    """The w > 0 solving (G w)_i = w_i^{-p} (Nash-MTL: p = 1; FairGrad: p = 1/alpha), on a normalised G.

    It is the minimiser of the strictly convex F(w) = 1/2 w^T G w - sum_i phi(w_i), phi' = w^{-p} (phi = log
    for p = 1), found by damped Newton with a fraction-to-the-boundary rule and Armijo backtracking (full
    steps once the Newton decrement is below what F's rounding can resolve, stopping when the residual
    stalls). The ``RIDGE``
    on the diagonal keeps a solution in existence when no positive one exists (tasks in exact conflict, G
    singular along a positive direction); tasks with zero gradient get weight 0.
    Starts from the exact solution for orthogonal gradients, w_i = G_ii^{-1/(1+p)}, rescaled optimally.
    """
    k = len(g)
    w_out = np.zeros(k)
    live = np.diag(g) > REL_TOL
    if not live.any():
        return w_out
    h = ridged(g[np.ix_(live, live)])

    def phi(w: np.ndarray) -> float:
        return float(np.log(w).sum()) if p == 1.0 else float((w ** (1.0 - p)).sum() / (1.0 - p))

    def objective(w: np.ndarray) -> float:
        return 0.5 * float(w @ h @ w) - phi(w)

    w = np.diag(h) ** (-1.0 / (1.0 + p))
    wgw = float(w @ h @ w)
    if wgw > 0:
        w = w * (float((w ** (1.0 - p)).sum()) / wgw) ** (1.0 / (1.0 + p))
    f = objective(w)
    best, stalled = math.inf, 0
    for _ in range(max_iter):
        wp = w ** (-p)
        grad = h @ w - wp
        res = float(np.abs(grad / wp).max())
        if res <= 1e-12 or stalled >= 3:
            break
        step = -lin_solve(h + np.diag(p * wp / w), grad)
        neg = step < 0
        t = min(1.0, 0.99 * float((w[neg] / -step[neg]).min())) if neg.any() else 1.0
        decrement = -float(grad @ step)
        rounding = 0.5 * float(np.abs(w) @ np.abs(h) @ np.abs(w)) + abs(phi(w)) + 1.0  # scale of F's rounding
        local = decrement <= 1e-10 * rounding
        stalled = stalled + 1 if local and res >= best else 0
        best = min(best, res)
        if not local:
            for _ in range(40):
                if objective(w + t * step) <= f - 1e-4 * t * decrement:
                    break
                t *= 0.5
        w = w + t * step
        f = objective(w)
    w_out[live] = _polish(g[np.ix_(live, live)], p, w)
    return w_out


def _polish(g: np.ndarray, p: float, w: np.ndarray) -> np.ndarray:
    """A few plain Newton steps on (G w)_i = w_i^{-p} without the ridge, kept only while the relative
    residual falls: exact where a positive solution exists, the ridged one where none does."""

    def residual(v: np.ndarray) -> float:
        return float(np.abs((g @ v) * v**p - 1.0).max())

    res = residual(w)
    for _ in range(10):
        if res <= 1e-13 or res > 1e-2:  # solved, or no positive solution nearby (keep the ridged one)
            break
        wp = w ** (-p)
        step = -lin_solve(g + np.diag(p * wp / w), g @ w - wp)
        trial = w + step
        if not (trial > 0).all():
            break
        new = residual(trial)
        if not new < res:
            break
        w, res = trial, new
    return w
