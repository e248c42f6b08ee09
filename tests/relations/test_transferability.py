"""LogME, LEEP, H-score, NCE on hand-checkable inputs, and the source x target transferability matrix."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.errors import ConfigError, DataError
from polytask.relations import TRANSFERABILITY, hscore, leep, logme, logme_evidence, nce, transferability_matrix

LABELS = np.array([0, 0, 1, 1, 2, 2, 2, 2])
H_Y = -sum(p * math.log(p) for p in (0.25, 0.25, 0.5))  # entropy of LABELS


def one_hot(y, c=None):
    c = c or int(y.max()) + 1
    return np.eye(c)[y]


# -- NCE ------------------------------------------------------------------------------------------------------------
def test_nce_informative_uninformative_and_a_hand_value():
    assert nce(np.array([5, 5, 7, 7, 1, 1, 1, 1]), LABELS) == pytest.approx(0.0)  # Z determines Y (relabelled)
    assert nce(np.zeros(8, dtype=int), LABELS) == pytest.approx(-H_Y)  # Z constant
    # Z = [0,0,1,1], Y = [0,1,1,1]: H(Y|Z) = 1/2 * H(1/2, 1/2) + 1/2 * 0 = log(2) / 2
    assert nce(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == pytest.approx(-math.log(2) / 2)


# -- LEEP ------------------------------------------------------------------------------------------------------------
def test_leep_informative_is_zero_and_uninformative_is_minus_entropy():
    perfect = one_hot(np.array([2, 2, 0, 0, 1, 1, 1, 1]))  # the source's dummy labels are a relabelling of Y
    assert leep(perfect, LABELS) == pytest.approx(0.0, abs=1e-12)
    flat = np.full((8, 4), 0.25)
    assert leep(flat, LABELS) == pytest.approx(-H_Y)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_leep_lies_between_minus_entropy_and_zero(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=30)
    logits = rng.normal(size=(30, 5)) * rng.uniform(0.1, 5)
    theta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p = np.bincount(y) / len(y)
    h = -sum(q * math.log(q) for q in p if q > 0)
    assert -h - 1e-9 <= leep(theta, y) <= 1e-12


def test_leep_rejects_logits():
    with pytest.raises(DataError, match="softmax"):
        leep(np.array([[2.0, -1.0], [0.5, 0.5]]), np.array([0, 1]))


# -- H-score ---------------------------------------------------------------------------------------------------------
def test_hscore_of_label_features_is_c_minus_1():
    assert hscore(one_hot(LABELS), LABELS, shrinkage=0.0) == pytest.approx(2.0)


def test_hscore_invariances():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    f = rng.normal(size=(200, 6)) + one_hot(y) @ rng.normal(size=(4, 6))
    h = hscore(f, y, shrinkage=0.0)
    a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    assert hscore(f @ a + 7.0, y, shrinkage=0.0) == pytest.approx(h, rel=1e-8)  # invertible affine map
    perm = np.array([2, 0, 3, 1])
    assert hscore(f, perm[y], shrinkage=0.0) == pytest.approx(h, rel=1e-12)  # relabelling the classes
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lw = hscore(f, y)
    assert hscore(3.0 * f @ q, y) == pytest.approx(lw, rel=1e-8)  # shrinkage keeps rotation/scale invariance
    assert 0.0 < h <= 3.0 and 0.0 < lw <= 3.0


def test_hscore_is_small_for_unrelated_features_and_stable_when_d_exceeds_n():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=500)
    assert hscore(rng.normal(size=(500, 5)), y, shrinkage=0.0) < 0.05
    wide = rng.normal(size=(20, 100))
    assert hscore(wide, y[:20], shrinkage=0.0) == pytest.approx(1.0)  # unregularised: random looks perfect
    h = hscore(wide, y[:20])
    assert 0.0 <= h < 0.5  # regularised: it does not
    with pytest.raises(ConfigError, match="shrinkage"):
        hscore(wide, y[:20], shrinkage=1.5)


# -- LogME -----------------------------------------------------------------------------------------------------------
def dense_evidence(f, y, alpha, beta):
    """log p(y | f, alpha, beta) two ways: the paper's closed form with dense matrices, and the Gaussian density
    y ~ N(0, I/beta + f f^T / alpha). Both divided by N."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    closed = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * np.linalg.slogdet(a)[1]
              - beta / 2 * np.sum((y - f @ m) ** 2) - alpha / 2 * m @ m - n / 2 * math.log(2 * math.pi))
    cov = np.eye(n) / beta + f @ f.T / alpha
    gauss = -0.5 * (np.linalg.slogdet(cov)[1] + y @ np.linalg.solve(cov, y) + n * math.log(2 * math.pi))
    return closed / n, gauss / n


@pytest.mark.parametrize(("n", "d"), [(60, 5), (12, 30), (40, 8)])
def test_logme_evidence_matches_brute_force_and_is_maximal(n, d):
    rng = np.random.default_rng(n + d)
    f = rng.normal(size=(n, d))
    if n == 40:
        f[:, -1] = f[:, 0]  # rank deficient
    y = f @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    ev, alpha, beta = logme_evidence(f, y)
    closed, gauss = dense_evidence(f, y, alpha, beta)
    assert ev == pytest.approx(closed, abs=1e-8) and ev == pytest.approx(gauss, abs=1e-8)
    for da in (0.7, 1.0, 1.4):
        for db in (0.7, 1.0, 1.4):
            assert dense_evidence(f, y, alpha * da, beta * db)[1] <= ev + 1e-3


def official_logme_evidence(f, y):
    """The reference code's fixed-point LogME (thuml/LogME, _fit_fixed_point), restated for the test: the
    evidence uses alpha, beta of the last update with the posterior terms of the iteration before it, and log|A|
    over the SVD's singular values only."""
    n, d = f.shape
    if n > d:
        evals, vecs = np.linalg.eigh(f.T @ f)
        keep = np.sqrt(np.maximum(evals, 0)) > 1e-10
        s = np.sqrt(evals[keep])
        u = f @ vecs[:, keep] / s
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
    sig, x2 = s**2, (u.T @ y) ** 2
    rest = y @ y - x2.sum()
    alpha = beta = 1.0
    for _ in range(11):
        t = alpha / beta
        gamma = np.sum(sig / (sig + t))
        m2 = np.sum(sig * x2 / (t + sig) ** 2)
        res2 = np.sum(x2 / (1 + sig / t) ** 2) + rest
        alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    ev = (d * math.log(alpha) + n * math.log(beta) - np.sum(np.log(alpha + beta * sig)) - beta * res2
          - alpha * m2 - n * math.log(2 * math.pi)) / 2
    return ev / n, alpha, beta


def _unconverged_case():
    """A target on which 11 fixed-point steps do not converge (found by search; n = 14, d = 4)."""
    rng = np.random.default_rng(2771)
    n, d = int(rng.integers(10, 60)), int(rng.integers(2, 30))
    f = rng.normal(size=(n, d)) * np.logspace(rng.uniform(-4, 0), rng.uniform(0, 4), d)
    return f, rng.normal(size=n) * 10 ** rng.uniform(-2, 2)


def test_logme_official_evidence_matches_the_reference_code_when_unconverged():
    f, y = _unconverged_case()
    exact, alpha, beta = logme_evidence(f, y)
    official, a2, b2 = logme_evidence(f, y, evidence="official")
    ref, a3, b3 = official_logme_evidence(f, y)
    assert (alpha, beta) == (a2, b2) and a3 == pytest.approx(alpha, rel=1e-9) and b3 == pytest.approx(beta, rel=1e-9)
    assert official == pytest.approx(ref, abs=1e-9)
    # the default is the exact evidence at the (alpha, beta) it returns; the reference differs when unconverged
    assert exact == pytest.approx(dense_evidence(f, y, alpha, beta)[1], abs=1e-9)
    assert abs(exact - official) > 0.01
    # rank-deficient wide features: the reference keeps all min(N, D) singular values, zeros included
    g = np.random.default_rng(1).normal(size=(12, 30))
    g[:, 1:] = g[:, :1] * np.arange(1, 30)
    yy = np.random.default_rng(2).normal(size=12)
    assert logme_evidence(g, yy, "official")[0] == pytest.approx(official_logme_evidence(g, yy)[0], abs=1e-9)
    assert logme(f, y, regression=True, evidence="official") == pytest.approx(official)
    with pytest.raises(ConfigError, match="evidence"):
        logme_evidence(f, y, "nope")
    m = transferability_matrix({"a": f, "b": f}, {"a": y, "b": y}, "logme",
                               {"regression": True, "evidence": "official"})
    assert m.matrix[0, 1] == pytest.approx(official)


def test_logme_prefers_features_that_determine_the_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=150)
    good = one_hot(y) @ rng.normal(size=(3, 10)) + 0.05 * rng.normal(size=(150, 10))
    bad = rng.normal(size=(150, 10))
    assert logme(good, y) > logme(bad, y) + 0.5
    reg = logme(good, good[:, :2] @ np.array([1.0, -2.0]), regression=True)
    assert reg > logme(bad, good[:, :2] @ np.array([1.0, -2.0]), regression=True)


def test_logme_is_the_mean_over_one_hot_columns():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(50, 4))
    y = rng.integers(0, 3, size=50)
    want = np.mean([logme_evidence(f, (y == c).astype(float))[0] for c in range(3)])
    assert logme(f, y) == pytest.approx(want)
    assert logme(torch.tensor(f), torch.tensor(y)) == pytest.approx(want)


# -- the matrix ------------------------------------------------------------------------------------------------------
def make_tasks(n=120, seed=0):
    """Three tasks on shared inputs: b is a relabelling of a; c is unrelated. Features of each source = its
    one-hot labels plus noise."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, size=n)
    labels = {"a": a.astype(float), "b": ((a + 1) % 3).astype(float), "c": rng.integers(0, 2, size=n).astype(float)}
    feats = {t: one_hot(v.astype(int)) + 0.1 * rng.normal(size=(n, int(v.max()) + 1)) for t, v in labels.items()}
    return feats, labels


@pytest.mark.parametrize("method", ["logme", "hscore", "nce", "leep"])
def test_transferability_matrix_ranks_related_sources_first(method):
    feats, labels = make_tasks()
    if method == "leep":
        feats = {t: np.exp(5 * f) / np.exp(5 * f).sum(1, keepdims=True) for t, f in feats.items()}
    aff = transferability_matrix(feats, labels, method)
    assert aff.tasks == ["a", "b", "c"] and aff.estimator == method and aff.higher_is_better
    assert aff.cost["training_runs"] == 0 and aff.meta["n_rows"] == 120
    m = aff.matrix
    assert m[0, 1] > m[2, 1] and m[1, 0] > m[2, 0]  # a and b transfer to each other better than c does


def test_transferability_matrix_masks_missing_labels_and_reads_source_predictions():
    feats, labels = make_tasks()
    labels["c"][:30] = np.nan
    aff = transferability_matrix(feats, labels, "nce")
    ok = ~np.isnan(labels["c"])
    assert aff.matrix[0, 2] == pytest.approx(nce(labels["a"][ok], labels["c"][ok]))
    pred = transferability_matrix(feats, labels, "nce", params={"source": "predictions"})
    assert pred.matrix[0, 1] == pytest.approx(0.0)  # argmax of a's features recovers a, which determines b


def test_transferability_matrix_errors():
    feats, labels = make_tasks()
    with pytest.raises(ConfigError, match="did you mean 'logme'"):
        transferability_matrix(feats, labels, "logmee")
    with pytest.raises(ConfigError, match="shrinkage"):
        transferability_matrix(feats, labels, "hscore", params={"shrinkag": 0.0})
    with pytest.raises(DataError, match="same N rows"):
        transferability_matrix({**feats, "c": feats["c"][:10]}, labels, "logme")
    with pytest.raises(DataError, match="no features"):
        transferability_matrix({"a": feats["a"]}, labels, "logme")
    assert TRANSFERABILITY.names() == ["hscore", "leep", "logme", "nce"]
