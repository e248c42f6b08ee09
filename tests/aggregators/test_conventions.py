"""Method-specific conventions against independent references on inputs the shared suite only checks for
generic properties: CAGrad's optimum on spread task norms (through ``aggregate``), IMTL-G's generalisation to
linearly dependent gradients, Aligned-MTL's rank tolerance in the input dtype."""

import math

import numpy as np
import pytest
import torch

from polytask.aggregators import _solvers as S
from polytask.aggregators import aggregate


def spread_rows(seed, k=10, p=1000, low=-3.0, high=3.0, dtype=torch.float64):
    """Rows of a random K x P matrix normalised, then scaled by logspace(low, high, K) (the issue's case)."""
    torch.manual_seed(seed)
    j = torch.randn(k, p, dtype=torch.float64)
    return (j / j.norm(dim=1, keepdim=True) * torch.logspace(low, high, k, dtype=torch.float64)[:, None]).to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 11, 16, 24, 29])
def test_cagrad_reaches_the_best_worst_task_improvement(seed):
    # issue 8, item 1 (seed 11): the worst-task improvement min_i g_i . d was -5.5e-3 where +4.3e-2 is possible.
    # Certificate: for any simplex w, a . w + r |g_w| bounds every d in the ball from above (weak duality), so
    # d is optimal when it reaches the bound of some w; the solver's own w serves as that witness
    j = spread_rows(seed)
    c = 0.5
    d = aggregate("cagrad", j, {"c": c, "rescale": 0})[0]
    g0 = j.mean(0)
    r = c * g0.norm().item()
    assert (d - g0).norm().item() <= r * (1 + 1e-9)
    gn, _ = S.normalize((j @ j.T).numpy())
    w, _ = S.cagrad_dual(gn, c * math.sqrt(gn.mean()))
    gram = (j @ j.T).numpy()
    bound = gram.mean(axis=1) @ w + r * math.sqrt(w @ gram @ w)
    worst = (j @ d).min().item()
    assert worst > 0
    assert worst >= bound - 1e-9 * abs(bound), (worst, bound)


def unit_rows(j):
    return j / np.linalg.norm(j, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_imtl_g_on_dependent_gradients_is_the_least_squares_equal_cosine_direction(seed):
    # issue 8, item 3: J = randn(5, 2) @ randn(2, 100) (K >= rank + 2) gave |d| = 2e-15. The generalisation:
    # d proportional to pinv(U) 1 (U the unit gradients), weights summing to 1; torchjd's: proportional to
    # pinv(J) |g|
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((5, 2)) @ rng.standard_normal((2, 100))
    for singular, expected in [("cosine", np.linalg.pinv(unit_rows(j)) @ np.ones(5)),
                               ("torchjd", np.linalg.pinv(j) @ np.linalg.norm(j, axis=1))]:
        d = aggregate("imtl_g", torch.from_numpy(j), {"singular": singular})[0].numpy()
        assert np.linalg.norm(d) > 1e-3 * np.linalg.norm(j, axis=1).max()
        cos = d @ expected / (np.linalg.norm(d) * np.linalg.norm(expected))
        assert abs(abs(cos) - 1) < 1e-9, (singular, cos)
        # the weights sum to 1: d = J^T alpha with sum(alpha) = 1 for the minimum-norm alpha along d's line
        alpha = np.linalg.lstsq(j.T, d, rcond=None)[0]
        null = np.linalg.svd(j.T)[2][2:]  # alpha + null-space combinations give the same d; one sums to 1
        shift = np.linalg.lstsq(null.T.sum(axis=0, keepdims=True), [1 - alpha.sum()], rcond=None)[0]
        assert np.allclose(j.T @ (alpha + null.T @ shift), d, atol=1e-9 * np.linalg.norm(d))


def test_imtl_g_generalisations_agree_with_the_paper_on_independent_gradients():
    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(2, 7))
        j = rng.standard_normal((k, k + 5)) * 10.0 ** rng.uniform(-2, 2, (k, 1))
        jt = torch.from_numpy(j)
        d = aggregate("imtl_g", jt)[0].numpy()
        # (torchjd's form inverts the unscaled G, whose condition grows with the norm spread: 1e-7 relative)
        torch.testing.assert_close(aggregate("imtl_g", jt, {"singular": "torchjd"})[0].numpy(), d, rtol=1e-5,
                                   atol=1e-8 * np.abs(d).max())
        cos = unit_rows(j) @ d
        np.testing.assert_allclose(cos, cos[0], rtol=1e-8)  # equal projections on the unit gradients
        alpha = np.linalg.lstsq(j.T, d, rcond=None)[0]
        assert abs(alpha.sum() - 1) < 1e-8


def aligned_reference(j, eps):
    """Aligned-MTL from the official form: eigenvalues of G above lambda_max K eps, B = sqrt(lambda_min)
    V diag(lambda^-1/2) V^T, d = J^T B 1, all in float64."""
    g = j @ j.T
    lam, vec = np.linalg.eigh(g)
    keep = lam > lam.max() * len(g) * eps
    lam, vec = lam[keep], vec[:, keep]
    return j.T @ (math.sqrt(lam.min()) * vec @ np.diag(lam**-0.5) @ vec.T @ np.ones(len(g)))


@pytest.mark.parametrize("seed", range(4))
def test_aligned_mtl_rank_tolerance_uses_the_input_dtype(seed):
    # issue 8, item 4: float64 gradients with norms 1e-3 .. 1e3 were cut with float32's epsilon (cosine
    # 0.28-0.77 to the float64 answer). Now float64 input gets float64's epsilon, float32 input float32's (the
    # official value), and rank_eps="float32" keeps the official rule for every input
    j = spread_rows(seed, k=6, p=50)
    jn = j.numpy()
    eps64, eps32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
    for got, want in [(aggregate("aligned_mtl", j)[0], aligned_reference(jn, eps64)),
                      (aggregate("aligned_mtl", j, {"rank_eps": "float32"})[0], aligned_reference(jn, eps32)),
                      (aggregate("aligned_mtl", j.float())[0].double(),
                       aligned_reference(j.float().double().numpy(), eps32))]:
        got = got.numpy()
        cos = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        assert cos > 1 - 1e-6, cos
        assert abs(np.linalg.norm(got) / np.linalg.norm(want) - 1) < 1e-5
    # the two rules differ here (the float32 rule drops real directions of these float64 gradients)
    a, b = aggregate("aligned_mtl", j)[0], aggregate("aligned_mtl", j, {"rank_eps": "float32"})[0]
    assert float(a @ b / (a.norm() * b.norm())) < 0.999
