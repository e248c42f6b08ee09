"""Golden values of every aggregator on the Jacobian J = [[-4, 1, 1], [6, 1, 1]] (torchjd's example).

Every number is derived by hand or from the paper's closed form in the comment next to it (and recomputed from
that closed form in plain Python), never copied from a run of the code. Shared quantities:
g1 = (-4, 1, 1), g2 = (6, 1, 1), G = J J^T = [[18, -22], [-22, 38]], |g1| = sqrt(18), |g2| = sqrt(38),
cos(g1, g2) = -22 / sqrt(684), the mean gradient g0 = (1, 1, 1), |g0| = sqrt(3).
"""

import math

import pytest
import torch

from polytask.aggregators import aggregate
from polytask.methods import load_all
from polytask.weighting.base import StepContext

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
S18, S38 = math.sqrt(18.0), math.sqrt(38.0)
U_SUM = (-4 / S18 + 6 / S38, 1 / S18 + 1 / S38)  # u1 + u2 (first coordinate, the two equal others)
PHI = -22 / math.sqrt(684.0)


def vec(x, y):
    return torch.tensor([x, y, y], dtype=torch.float64)


def from_weights(a, b):
    """a g1 + b g2."""
    return vec(-4 * a + 6 * b, a + b)


def nash_closed_form():
    # G a = 1/a: a1 (18 a1 - 22 a2) = 1 = a2 (38 a2 - 22 a1) => 18 a1^2 = 38 a2^2, a1 = sqrt(19/9) a2 and
    # a2^2 (38 - 22 sqrt(19/9)) = 1
    a2 = (38 - 22 * math.sqrt(19 / 9)) ** -0.5
    return math.sqrt(19 / 9) * a2, a2


def fairgrad_alpha2_by_bisection():
    # (G w)_i = w_i^(-1/2): the first equation gives w2 = (18 w1 - w1^-1/2) / 22 (> 0 for w1 > 18^(-2/3));
    # the second, h(w1) = -22 w1 + 38 w2 - w2^-1/2 = 0, is solved by bisection (h < 0 at the left end, > 0 at 10)
    def w2(w1):
        return (18 * w1 - w1**-0.5) / 22

    def h(w1):
        return -22 * w1 + 38 * w2(w1) - w2(w1) ** -0.5

    lo, hi = 18 ** (-2 / 3) * (1 + 1e-9), 10.0
    assert h(lo) < 0 < h(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if h(mid) > 0 else (mid, hi)
    return lo, w2(lo)


def aligned_closed_form(scale):
    # eigenvalues of G: 28 +- sqrt(584); W = sqrt(sigma) G^(-1/2), weights W 1. For a 2 x 2 SPD matrix
    # G^(1/2) = (G + sqrt(det) I) / sqrt(tr + 2 sqrt(det)), so G^(-1/2) = sqrt(tr + 2 sqrt(det)) (G + sqrt(det) I)^-1
    det, tr = 200.0, 56.0
    m = torch.tensor([[18.0, -22.0], [-22.0, 38.0]], dtype=torch.float64) + math.sqrt(det) * torch.eye(2)
    w = math.sqrt(scale) * math.sqrt(tr + 2 * math.sqrt(det)) * torch.linalg.solve(m, torch.ones(2, dtype=m.dtype))
    return from_weights(float(w[0]), float(w[1]))


def gradvac_second_step(beta):
    # after step 1 (targets 0 -> both targets are beta phi), the same J: phi < phi_hat, so
    # g_i' = g_i + |g_i| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) / (|g_j| sqrt(1-phi_hat^2)) g_j
    hat = beta * PHI
    core = (hat * math.sqrt(1 - PHI**2) - PHI * math.sqrt(1 - hat**2)) / math.sqrt(1 - hat**2)
    c12, c21 = S18 * core / S38, S38 * core / S18
    return from_weights(1 + c21, 1 + c12)


# (name, params, losses, expected, justification)
CASES = [
    ("mean", {}, None, vec(1, 1), "(g1 + g2) / 2"),
    ("sum", {}, None, vec(2, 2), "g1 + g2"),
    # min over w in [0,1] of |w g1 + (1-w) g2|^2 = 100 w^2 - 120 w + 38 -> w = 0.6: 0.6 g1 + 0.4 g2 = (0, 1, 1)
    ("mgda", {}, None, vec(0, 1), "min-norm point of the segment [g1, g2]"),
    # unit-normalised G has equal diagonal, so by symmetry w = (1/2, 1/2), applied to the raw gradients
    ("mgda", {"normalization": "l2"}, None, vec(1, 1), "Sener & Koltun 'l2': equal weights on raw grads"),
    # g1 . g2 = -22 < 0: g1' = g1 + 22/38 g2, g2' = g2 + 22/18 g1; sum = 20/9 g1 + 30/19 g2 = (100, 650, 650)/171
    ("pcgrad", {}, None, vec(100 / 171, 650 / 171), "both gradients projected off each other"),
    ("pcgrad", {"reduction": "mean"}, None, vec(50 / 171, 325 / 171), "PCGrad sum / 2"),
    # targets start at 0: the correction |g_i| (-phi) / |g_j| = -g_i.g_j / |g_j|^2 is PCGrad's projection
    ("gradvac", {}, None, vec(100 / 171, 650 / 171), "fresh targets phi_hat = 0 reduce GradVac to PCGrad"),
    # dual over the segment w = (t, 1-t): f(t) = 8 - 10 t + r sqrt(100 t^2 - 120 t + 38), r = 0.4 sqrt(3) < 1,
    # f'(t) = -10 + r u / sqrt(u^2/100 + 2) < -10 + 10 r < 0 (u = 100 t - 60), so t = 1, g_w = g1 and
    # d = g0 + r g1 / |g1| = (1,1,1) + (0.4/sqrt(6)) (-4,1,1), then / (1 + c^2) = / 1.16
    ("cagrad", {}, None, vec((1 - 1.6 / math.sqrt(6)) / 1.16, (1 + 0.4 / math.sqrt(6)) / 1.16), "Alg. 1, c=0.4"),
    # same optimum t = 1 (r = 0.5 sqrt(3) < 1), no rescale: (1,1,1) + (0.5/sqrt(6)) (-4,1,1)
    ("cagrad", {"c": 0.5, "rescale": 0}, None, vec(1 - 2 / math.sqrt(6), 1 + 0.5 / math.sqrt(6)), "c=0.5"),
    ("cagrad", {"rescale": 2}, None, vec((1 - 1.6 / math.sqrt(6)) / 1.4, (1 + 0.4 / math.sqrt(6)) / 1.4), "/(1+c)"),
    ("cagrad", {"reduction": "sum"}, None,
     vec(2 * (1 - 1.6 / math.sqrt(6)) / 1.16, 2 * (1 + 0.4 / math.sqrt(6)) / 1.16), "K x the mean convention"),
    # K = 2: d = a1 g1 + (1-a1) g2 with d.(u1 - u2) = 0, a1 = g2.(u2-u1) / ((g1-g2).(u1-u2))
    #      = (38 sqrt(18) + 22 sqrt(38)) / (60 sqrt(18) + 40 sqrt(38)); d = (6 - 10 a1, 1, 1)
    ("imtl_g", {}, None, vec(6 - 10 * (38 * S18 + 22 * S38) / (60 * S18 + 40 * S38), 1), "IMTL-G closed form"),
    ("nashmtl", {}, None, from_weights(*nash_closed_form()), "G a = 1/a in closed form (|d|^2 = K = 2)"),
    # clipped to norm 1: the closed form / sqrt(2) (torchjd documents (0.0542, 0.7061, 0.7061) for this J)
    ("nashmtl", {"max_norm": 1.0}, None, from_weights(*nash_closed_form()) / math.sqrt(2), "official max_norm 1"),
    ("fairgrad", {}, None, from_weights(*nash_closed_form()), "alpha = 1 is Nash-MTL"),
    ("fairgrad", {"alpha": 2.0}, None, from_weights(*fairgrad_alpha2_by_bisection()), "G w = w^(-1/2)"),
    ("aligned_mtl", {}, None, aligned_closed_form(28 - math.sqrt(584)), "sigma = smallest eigenvalue"),
    ("aligned_mtl", {"scale_mode": "median"}, None, aligned_closed_form(28 - math.sqrt(584)), "lower median"),
    ("aligned_mtl", {"scale_mode": "rmse"}, None, aligned_closed_form(28.0), "sigma = mean eigenvalue = 28"),
    # project g1 onto {g2.x >= 0}: g1 + 22/38 g2 (g1 . it = 18 - 484/38 > 0, so feasible); g2 -> g2 + 22/18 g1;
    # average: (20/18) g1 + (30/38) g2 = (50, 325, 325) / 171
    ("upgrad", {}, None, vec(50 / 171, 325 / 171), "mean of the two projections"),
    # g0 = (1,1,1): g1.g0 = -2 < 0, g2.g0 = 8 > 0; project onto {g1.x >= 0}: g0 + 2/18 g1 = (5/9, 10/9, 10/9),
    # g2 . it = 8 - 44/18 > 0
    ("dualproj", {}, None, vec(5 / 9, 10 / 9), "projection of the mean onto the dual cone"),
    # C = [[1, phi], [phi, 1]]: C^-1 1 = 1/(1+phi) (1, 1), so y ~ u1 + u2; length sum_i g_i.(u1+u2)/|u1+u2|
    # = (|g1| + |g2|)(1 + phi)/|u1+u2| and |u1+u2|^2 = 2(1 + phi): d = (|g1| + |g2|)/2 (u1 + u2)
    ("config", {}, None, vec((S18 + S38) / 2 * U_SUM[0], (S18 + S38) / 2 * U_SUM[1]), "Eq. 2-3, K = 2"),
    # step 1 returns the initial weights 1
    ("gradnorm", {}, torch.ones(2), vec(2, 2), "initial weights w = 1"),
    # losses 2 and 0.5: b_k = (1 - 0.9) g_k / (L_k + 1e-8); max norm 0.1 sqrt(38) / (0.5 + 1e-8);
    # d = max_norm (u1 + u2)
    ("dbmtl", {}, torch.tensor([2.0, 0.5]),
     vec(0.1 * S38 / (0.5 + 1e-8) * U_SUM[0], 0.1 * S38 / (0.5 + 1e-8) * U_SUM[1]), "first EMA step"),
]


@pytest.mark.parametrize(("name", "params", "losses", "expected", "why"), CASES, ids=lambda v: str(v)[:20])
def test_pinned(name, params, losses, expected, why):
    ctx = StepContext(step=0, epoch=0, losses=losses)
    d = aggregate(name, J, params=params, ctx=ctx)[0]
    torch.testing.assert_close(d, expected, rtol=1e-8, atol=1e-9, msg=f"{name} {params}: {why}")


def test_every_aggregator_is_pinned():
    names = {e.name for e in load_all() if e.extra.get("kind") == "aggregator"}
    assert names <= {c[0] for c in CASES} | {"graddrop"}


def test_pinned_decimals():
    # the closed forms above, written out, so a change to a formula above cannot hide behind itself
    d = {c[0] + str(c[1]): c[3] for c in CASES}
    torch.testing.assert_close(d["nashmtl{}"], vec(0.0765842884, 0.9985326351), rtol=0, atol=1e-9)
    torch.testing.assert_close(d["imtl_g{}"], vec(0.0766968306, 1.0), rtol=0, atol=1e-9)
    torch.testing.assert_close(d["cagrad{}"], vec(0.2989678752, 1.0028442381), rtol=0, atol=1e-9)
    torch.testing.assert_close(d["aligned_mtl{}"], vec(0.4265574919, 1.9346659675), rtol=0, atol=1e-9)
    torch.testing.assert_close(d["config{}"], vec(0.1588089758, 2.0706067581), rtol=0, atol=1e-9)
    torch.testing.assert_close(d["fairgrad{'alpha': 2.0}"], vec(0.0312736798, 0.7908171505), rtol=0, atol=1e-9)
    torch.testing.assert_close(d["dbmtl{}"], vec(0.0376269476, 0.4905932531), rtol=0, atol=1e-9)


def test_graddrop_pinned():
    # column 1: sum 2, |sum| 10 -> purity P = (1 + 2/10)/2 = 0.6; columns 2, 3 all positive -> P = 1 (kept for
    # any U < 1). The uniforms are float64 draws whatever J's dtype: with generator seed 1 the first is
    # 0.0611 < 0.6: positive sign kept -> 6; with seed 0 it is 0.9701 > 0.6: negative sign kept -> -4
    for jac in (J.float(), J):
        for seed, first, expected in [(1, 0.0611, vec(6, 2)), (0, 0.9701, vec(-4, 2))]:
            draw = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            assert abs(draw[0].item() - first) < 1e-4
            ctx = StepContext(step=0, epoch=0, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(aggregate("graddrop", jac, ctx=ctx)[0], expected.to(jac.dtype), rtol=0, atol=0)
    # leak 1 keeps every gradient: the plain sum; leak 0.5 with seed 1 keeps 6 fully and half of -4: 4
    jac = J.float()
    ctx = StepContext(step=0, epoch=0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aggregate("graddrop", jac, params={"leak": 1.0}, ctx=ctx)[0], vec(2, 2).float())
    ctx = StepContext(step=0, epoch=0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aggregate("graddrop", jac, params={"leak": 0.5}, ctx=ctx)[0], vec(4, 2).float())


def test_stateful_second_steps_pinned():
    ctx = StepContext(step=0, epoch=0, losses=torch.ones(2))
    # GradVac, beta = 0.01: the second call on the same J uses the targets beta * phi (derivation above)
    d1, state = aggregate("gradvac", J, ctx=ctx)
    d2, _ = aggregate("gradvac", J, state=state, ctx=ctx)
    torch.testing.assert_close(d2, gradvac_second_step(0.01), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d2, vec(0.5924481429, 3.7914296363), rtol=0, atol=1e-9)
    # GradNorm (alpha 1.5, lr 0.025), equal losses so r = 1: target mean(w|g|) = (|g1| + |g2|)/2, sign(w|g| - T)
    # = (-1, +1), w <- (1 + lr |g1|, 1 - lr |g2|), renormalised to sum 2
    _, state = aggregate("gradnorm", J, ctx=ctx)
    d2, _ = aggregate("gradnorm", J, state=state, ctx=ctx)
    w = torch.tensor([1 + 0.025 * S18, 1 - 0.025 * S38], dtype=torch.float64)
    w = 2 * w / w.sum()
    torch.testing.assert_close(d2, from_weights(float(w[0]), float(w[1])), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d2, vec(0.6670989939, 2.0), rtol=0, atol=1e-9)
    # DB-MTL, second step on the same input: b2 = lg + (0.9/sqrt(2)) (0.1 lg - lg) = (1 - 0.81/sqrt(2)) lg
    ctx = StepContext(step=0, epoch=0, losses=torch.tensor([2.0, 0.5]))
    d1, state = aggregate("dbmtl", J, ctx=ctx)
    d2, _ = aggregate("dbmtl", J, state=state, ctx=ctx)
    torch.testing.assert_close(d2, d1 * (1 - 0.81 / math.sqrt(2)) / 0.1, rtol=1e-12, atol=1e-12)
    # Nash-MTL reuses the last weights between updates: with update_weights_every=2 the second call on 2 J
    # keeps alpha, so the direction doubles (the fresh solution would be unchanged, Nash being scale-invariant)
    d1, state = aggregate("nashmtl", J, params={"update_weights_every": 2}, ctx=ctx)
    d2, _ = aggregate("nashmtl", 2 * J, params={"update_weights_every": 2}, state=state, ctx=ctx)
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-12, atol=1e-12)
