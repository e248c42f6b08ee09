"""Source -> target transferability from frozen features or predictions, no fine-tuning (all: higher is better).

* :func:`logme` -- You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"
  (ICML), with the fixed-point evidence maximisation of You et al. 2021b, "Ranking and Tuning Pre-trained Models"
  (arXiv:2110.10545), the official code's default.
* :func:`leep` -- Nguyen et al. 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations" (ICML).
* :func:`hscore` -- Bao et al. 2019, "An Information-Theoretic Approach to Transferability in Task Transfer
  Learning" (ICIP), by default in the shrinkage-regularised form of Ibrahim et al. 2022 ("Newer is not always
  better: Rethinking transferability metrics, their peculiarities, stability and performance", ECML-PKDD).
* :func:`nce` -- Tran et al. 2019, "Transferability and Hardness of Supervised Classification Tasks" (ICCV).

:func:`transferability_matrix` scores every (source task i, target task j) pair into an :class:`AffinityMatrix`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from polytask.errors import ConfigError, DataError
from polytask.registry import NoParams, Registry
from polytask.relations.affinity import AffinityMatrix

# --------------------------------------------------------------------------------------------------------------
# LogME
# --------------------------------------------------------------------------------------------------------------
LOGME_MAX_ITER = 11  # the official code: "should converge after at most 10 steps"
LOGME_TOL = 1e-3  # |t' - t| / t <= 1e-3, t = alpha / beta
LOGME_EPS = 1e-5  # added to the denominators of the alpha and beta updates


def _svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, s): left singular vectors and the non-zero singular values of f (N x D), as in the official code."""
    n, d = f.shape
    if n > d:  # through the D x D Gram matrix, cheaper for tall f
        _, s2, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(np.maximum(s2, 0.0))
        keep = s > 1e-10
        return (f @ vh[keep].T) / s[keep][None, :], s[keep]
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10
    return u[:, keep], s[keep]


LOGME_EVIDENCE = ("final", "official")


def logme_evidence(features: np.ndarray, y: np.ndarray, evidence: str = "final") -> tuple[float, float, float]:
    """(log evidence / N, alpha, beta) of Bayesian linear regression y ~ N(f w, 1/beta), w ~ N(0, I/alpha),
    with alpha, beta maximising the evidence by the fixed-point iteration of You et al. (2021b, Alg. 2).

    The iteration (start alpha = beta = 1; at most 11 steps; stop when t = alpha/beta moves by <= 1e-3
    relatively) follows the official LogME code (thuml/LogME, ``_fit_fixed_point``). What is returned differs:

    * ``evidence="final"`` (default): the exact log marginal likelihood at the returned (alpha, beta),
      log N(y | 0, I/beta + f f^T/alpha) / N, with the posterior terms recomputed at t = alpha/beta after the
      last update and log|A| including (D - rank) log(alpha) when f has fewer non-zero singular values than
      columns. The score and the (alpha, beta) it reports belong together, also when 11 steps did not converge.
    * ``evidence="official"``: as the reference code: alpha, beta of the last update with the posterior terms of
      the iteration before it (they differ by the tolerance when converged, by more when not), and log|A| over
      the singular values of the SVD only (all min(N, D) of them when N <= D, the non-zero ones when N > D).
    """
    if evidence not in LOGME_EVIDENCE:
        raise ConfigError(f"logme: evidence must be one of {LOGME_EVIDENCE}, got {evidence!r}")
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n, d = f.shape
    if evidence == "official" and n <= d:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
    else:
        u, s = _svd(f)
    sigma = s**2
    x = u.T @ y
    x2 = x**2
    res_x2 = max(float(y @ y - x2.sum()), 0.0)

    def posterior(t: float) -> tuple[float, float, float]:
        """(gamma, |m|^2, |y - f m|^2) at t = alpha / beta."""
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + res_x2
        return gamma, m2, res2

    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITER):
        t = alpha / beta
        gamma, m2, res2 = posterior(t)
        alpha = gamma / (m2 + LOGME_EPS)
        beta = (n - gamma) / (res2 + LOGME_EPS)
        if abs(alpha / beta - t) / t <= LOGME_TOL:
            break
    log_det_a = float(np.log(alpha + beta * sigma).sum())
    if evidence == "final":
        _, m2, res2 = posterior(alpha / beta)
        log_det_a += (d - len(sigma)) * math.log(alpha)
    value = (
        d / 2.0 * math.log(alpha)
        + n / 2.0 * math.log(beta)
        - 0.5 * log_det_a
        - beta / 2.0 * res2
        - alpha / 2.0 * m2
        - n / 2.0 * math.log(2 * math.pi)
    )
    return value / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray, regression: bool = False, evidence: str = "final") -> float:
    """LogME (You et al. 2021): the mean over target columns of the maximised log evidence per sample
    (``evidence``: see :func:`logme_evidence`).

    Classification: ``labels`` are class ids; each class present is one one-hot column (the official code uses
    ``range(max + 1)``; the same when every class appears). Regression: ``labels`` is N or N x C real targets.
    """
    f = _features(features, "logme")
    if regression:
        y = np.asarray(labels, dtype=np.float64)
        y = y.reshape(len(y), -1)
        cols = [y[:, c] for c in range(y.shape[1])]
    else:
        lab = _class_labels(labels, "logme")
        cols = [(lab == c).astype(np.float64) for c in np.unique(lab)]
    if len(f) != len(cols[0]):
        raise DataError(f"logme: {len(f)} feature rows for {len(cols[0])} labels")
    return float(np.mean([logme_evidence(f, col, evidence)[0] for col in cols]))


# --------------------------------------------------------------------------------------------------------------
# LEEP, NCE
# --------------------------------------------------------------------------------------------------------------
def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al. 2020, Eq. 2): the mean log-likelihood of the target labels under the "expected
    empirical predictor" sum_z P(y | z) theta(x)_z, where theta(x) is the source model's softmax output and
    P(y | z) = P(y, z) / P(z) with P(y, z) = (1/N) sum_{i: y_i = y} theta(x_i)_z. At most 0 (a source whose
    dummy labels determine the target), at least -H(Y) for any source (equality for an uninformative one).
    """
    theta = _features(source_probs, "leep")
    lab = _class_labels(labels, "leep")
    if len(theta) != len(lab):
        raise DataError(f"leep: {len(theta)} prediction rows for {len(lab)} labels")
    if (theta < 0).any() or not np.allclose(theta.sum(1), 1.0, atol=1e-4):
        raise DataError("leep: source predictions must be probabilities (rows >= 0 summing to 1; apply softmax)")
    n = len(lab)
    _, y = np.unique(lab, return_inverse=True)
    joint = np.zeros((y.max() + 1, theta.shape[1]))
    np.add.at(joint, y, theta / n)
    pz = joint.sum(0, keepdims=True)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P(y | z)
    eep = (theta @ cond.T)[np.arange(n), y]
    return float(np.mean(np.log(eep)))


def nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al. 2019, Eq. 3 & 7): the negative conditional entropy -H(Y | Z) of target labels Y given
    source labels Z on the same inputs (true source labels, or a source model's argmax predictions). 0 when Z
    determines Y; -H(Y) when Z is independent of Y.
    """
    z = _class_labels(source_labels, "nce (source)")
    y = _class_labels(labels, "nce")
    if len(z) != len(y):
        raise DataError(f"nce: {len(z)} source labels for {len(y)} target labels")
    _, zi = np.unique(z, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((zi.max() + 1, yi.max() + 1))
    np.add.at(joint, (zi, yi), 1.0 / len(y))
    pz = joint.sum(1, keepdims=True)
    cond = joint / pz
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(cond), 0.0)
    return float(terms.sum())


# --------------------------------------------------------------------------------------------------------------
# H-score
# --------------------------------------------------------------------------------------------------------------
def shrunk_covariance(x: np.ndarray, shrinkage: float | Literal["ledoit-wolf"]) -> tuple[np.ndarray, float]:
    """((1 - a) cov(x) + a tr(cov(x))/D I, a) with the biased covariance; ``"ledoit-wolf"`` picks a (Ledoit &
    Wolf 2004, via scikit-learn)."""
    xc = x - x.mean(0, keepdims=True)
    cov = xc.T @ xc / len(x)
    if shrinkage == "ledoit-wolf":
        from sklearn.covariance import ledoit_wolf_shrinkage

        a = float(ledoit_wolf_shrinkage(x, assume_centered=False))
    else:
        a = float(shrinkage)
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"hscore: shrinkage must be in [0, 1] or 'ledoit-wolf', got {shrinkage!r}")
    if a == 0.0:
        return cov, 0.0
    mu = float(np.trace(cov)) / cov.shape[0]
    return (1.0 - a) * cov + a * mu * np.eye(cov.shape[0]), a


def hscore(
    features: np.ndarray, labels: np.ndarray, shrinkage: float | Literal["ledoit-wolf"] = "ledoit-wolf"
) -> float:
    """H-score (Bao et al. 2019, Def. 2): tr(cov(f)^+ cov(E[f | y])), the share of feature variance explained by
    the class means, between 0 and min(C - 1, D). The pseudo-inverse drops eigenvalues below 1e-10 of the
    largest. With ``shrinkage`` a > 0 it is the regularised H-score of Ibrahim et al. (2022),
    tr(cov_a(f)^-1 (1 - a) cov(E[f | y])) with cov_a(f) = (1 - a) cov(f) + a tr(cov(f))/D I (default: a by
    Ledoit-Wolf), which stays meaningful when D is large against N (unregularised, any N <= D features score the
    maximum C - 1). ``shrinkage=0`` is the original, invariant to any invertible affine map of the features.
    """
    f = _features(features, "hscore")
    lab = _class_labels(labels, "hscore")
    if len(f) != len(lab):
        raise DataError(f"hscore: {len(f)} feature rows for {len(lab)} labels")
    cov_f, a = shrunk_covariance(f, shrinkage)
    _, y = np.unique(lab, return_inverse=True)
    counts = np.bincount(y).astype(np.float64)
    means = np.zeros((len(counts), f.shape[1]))
    np.add.at(means, y, f)
    means /= counts[:, None]
    g = means[y]
    gc = g - g.mean(0, keepdims=True)
    cov_g = (1.0 - a) * (gc.T @ gc) / len(g)
    inv = np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True)
    return float(np.trace(inv @ cov_g))


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def _features(x: Any, who: str) -> np.ndarray:
    f = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2 or len(f) == 0:
        raise DataError(f"{who}: features must be a non-empty N x D array, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise DataError(f"{who}: features contain NaN or inf")
    return f


def _class_labels(x: Any, who: str) -> np.ndarray:
    y = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) == 0:
        raise DataError(f"{who}: labels must be a non-empty 1-D array of class ids, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{who}: class labels must be whole numbers (mask missing labels first)")
        y = y.astype(np.int64)
    return y


# --------------------------------------------------------------------------------------------------------------
# Registry and the K x K matrix
# --------------------------------------------------------------------------------------------------------------
TRANSFERABILITY: Registry[Any] = Registry("transferability metric")


class LogMEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regression: bool = Field(False, description="real-valued targets instead of class ids")
    evidence: Literal["final", "official"] = Field(
        "final", description="final: exact evidence at the returned alpha, beta; official: as the reference code")


class HScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shrinkage: float | Literal["ledoit-wolf"] = Field("ledoit-wolf", description="covariance shrinkage")


class NCEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["labels", "predictions"] = Field(
        "labels", description="source task's true labels, or the argmax of its features/predictions")


@TRANSFERABILITY.register("logme", params=LogMEParams, summary="maximum evidence of a linear model on features",
                          paper="You et al. 2021, LogME", source="features")
def _logme(params: LogMEParams, features: np.ndarray, labels: np.ndarray) -> float:
    return logme(features, labels, params.regression, params.evidence)


@TRANSFERABILITY.register("leep", summary="log expected empirical prediction",
                          paper="Nguyen et al. 2020, LEEP", source="features")
def _leep(params: NoParams, probs: np.ndarray, labels: np.ndarray) -> float:
    return leep(probs, labels)


@TRANSFERABILITY.register("hscore", params=HScoreParams, summary="tr(cov(f)^-1 cov(E[f|y]))",
                          paper="Bao et al. 2019, H-score", source="features")
def _hscore(params: HScoreParams, features: np.ndarray, labels: np.ndarray) -> float:
    return hscore(features, labels, params.shrinkage)


@TRANSFERABILITY.register("nce", params=NCEParams, summary="negative conditional entropy H(Y_target | Y_source)",
                          paper="Tran et al. 2019, NCE", source="labels")
def _nce(params: NCEParams, source_labels: np.ndarray, labels: np.ndarray) -> float:
    return nce(source_labels, labels)


def transferability_matrix(
    features_by_task: Mapping[str, Any],
    labels_by_task: Mapping[str, Any],
    method: str = "logme",
    params: Mapping[str, Any] | BaseModel | None = None,
    tasks: Sequence[str] | None = None,
) -> AffinityMatrix:
    """Score every source i -> target j: ``[i, j] = method(features of task i, labels of task j)``.

    All tasks share the same N inputs (rows aligned). ``features_by_task[i]`` is what the source contributes: an
    N x D representation (logme, hscore) or softmax predictions (leep), e.g. from task i's single-task model.
    NCE reads the source's labels (``labels_by_task[i]``), or with ``params={"source": "predictions"}`` the
    argmax of ``features_by_task[i]``. NaN labels mark missing rows; each pair uses the rows labelled for both.
    The diagonal is the task scored on its own labels.
    """
    entry = TRANSFERABILITY.get(method)
    p = TRANSFERABILITY.params_for(method, params, where="params")
    names = list(tasks) if tasks is not None else list(labels_by_task)
    missing_l = [t for t in names if t not in labels_by_task]
    if missing_l:
        raise DataError(f"transferability_matrix: no labels for tasks {missing_l}")
    use_labels_as_source = method == "nce" and getattr(p, "source", "labels") == "labels"
    if not use_labels_as_source:
        missing_f = [t for t in names if t not in features_by_task]
        if missing_f:
            raise DataError(f"transferability_matrix: no features for tasks {missing_f}")
    lab = {t: np.asarray(_np(labels_by_task[t]), dtype=np.float64) for t in names}
    n = {len(v) for v in lab.values()}
    src: dict[str, np.ndarray] = {}
    for t in names:
        if use_labels_as_source:
            src[t] = lab[t]
        else:
            f = np.asarray(_np(features_by_task[t]), dtype=np.float64)
            src[t] = f.argmax(1).astype(np.float64) if method == "nce" and f.ndim == 2 else f
        n.add(len(src[t]))
    if len(n) != 1:
        raise DataError(f"transferability_matrix: every task needs the same N rows, got sizes {sorted(n)}")
    t0 = time.perf_counter()
    k = len(names)
    m = np.zeros((k, k))
    for j, tj in enumerate(names):
        y = lab[tj].reshape(len(lab[tj]), -1)
        ok_y = ~np.isnan(y).any(1)
        for i, ti in enumerate(names):
            x = src[ti]
            ok = ok_y & (~np.isnan(x) if x.ndim == 1 else np.ones(len(x), dtype=bool))
            if ok.sum() < 2:
                raise DataError(f"transferability_matrix: fewer than 2 rows labelled for both {ti!r} and {tj!r}")
            target = y[ok] if y.shape[1] > 1 else y[ok, 0]
            m[i, j] = entry.build(p, x[ok], target)
    return AffinityMatrix(
        m, names, method,
        cost={"training_runs": 0, "forward_passes": 0, "backward_passes": 0, "pairs": k * k,
              "wall_time_s": round(time.perf_counter() - t0, 6)},
        higher_is_better=True,
        meta={"params": p.model_dump(), "paper": entry.paper, "n_rows": int(n.pop())},
    )


def _np(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
