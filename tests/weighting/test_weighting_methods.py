"""Each weighting behaves as its paper says, on small problems whose answer is known."""

import math

import pytest
import torch

from polytask.errors import ConfigError
from polytask.weighting import StepContext, build_weighting
from polytask.weighting.coba import (
    absolute_convergence,
    coba_weights,
    convergence_slopes,
    divergence_factor,
    largest_loss_slope,
    relative_convergence,
)
from polytask.weighting.famo import famo_logit_grad, famo_weights

TASKS = ["a", "b"]


def ctx(step, epoch=0, **kw):
    return StepContext(step, epoch, **kw)


# ---------------------------------------------------------------- UW


def test_uw_learns_the_inverse_noise_variance_ratio():
    """Kendall et al.: at the optimum of exp(-s_k) L_k + s_k, s_k = log E[L_k]. Two heads fitting the same
    linear f under noise std 0.1 and 1.0 reach L_k ~ sigma_k^2, so exp(-s_1)/exp(-s_2) ~ 1.0^2/0.1^2 = 100."""
    torch.manual_seed(0)
    beta = torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    w = build_weighting("uw", {"lr": 0.05}, TASKS)
    state = w.init()
    noise = torch.tensor([0.1, 1.0])
    for step in range(600):
        x = torch.randn(64, 4)
        y = (x @ beta)[:, None] + noise * torch.randn(64, 2)
        losses = ((model(x) - y) ** 2).mean(dim=0)
        weights, state = w.update(state, losses.detach(), ctx(step))
        opt.zero_grad()
        (weights * losses).sum().backward()
        opt.step()
    ratio = float(torch.exp(-state["s"][0]) / torch.exp(-state["s"][1]))
    assert 50 < ratio < 200, ratio
    torch.testing.assert_close(torch.exp(state["s"]), noise.double() ** 2, rtol=0.5, atol=0.0)


# ---------------------------------------------------------------- IMTL-L


def test_imtl_l_makes_the_scaled_losses_equal():
    """Liu et al. 2021: e^{s_k} L_k - s_k is minimised at e^{s_k} L_k = 1 for every task. (Adam needs a few
    thousand steps here: the huge early gradients of the 1e3 task inflate its second moment.)"""
    w = build_weighting("imtl_l", {"lr": 0.1}, TASKS)
    state = w.init()
    losses = torch.tensor([1e-3, 1e3])
    for step in range(2500):
        weights, state = w.update(state, losses, ctx(step))
    scaled = weights.double() * losses.double()
    assert float(scaled.max() / scaled.min()) < 1.05, scaled
    torch.testing.assert_close(scaled, torch.ones(2, dtype=torch.float64), rtol=0.05, atol=0.0)


# ---------------------------------------------------------------- DWA


def test_dwa_follows_the_formula_on_epoch_average_losses():
    """Weights are 1 during epochs 0 and 1; in epoch 2, r = L(1)/L(0) from the epoch means, w = 2 softmax(r/T)."""
    w = build_weighting("dwa", {"temperature": 2.0}, TASKS)
    state = w.init()
    epochs = [
        [[1.0, 5.0], [3.0, 3.0]],  # means [2, 4]
        [[0.5, 4.0], [1.5, 4.0]],  # means [1, 4]
        [[9.0, 9.0], [9.0, 9.0]],
    ]
    out = []
    step = 0
    for epoch, steps in enumerate(epochs):
        for losses in steps:
            weights, state = w.update(state, torch.tensor(losses), ctx(step, epoch))
            out.append(weights)
            step += 1
    for weights in out[:4]:
        assert torch.equal(weights, torch.ones(2))
    # r = [1/2, 4/4]: exp(0.25) = 1.284025, exp(0.5) = 1.648721
    expected = torch.tensor([2 * 1.284025 / (1.284025 + 1.648721), 2 * 1.648721 / (1.284025 + 1.648721)])
    for weights in out[4:]:
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(out[4][0]), 0.875647, rel_tol=1e-5)


def test_dwa_weights_the_task_whose_loss_falls_slowest_more():
    w = build_weighting("dwa", {}, ["a", "b", "c"])
    state = w.init()
    for epoch, losses in enumerate([[4.0, 4.0, 4.0], [1.0, 2.0, 4.0], [1.0, 1.0, 1.0]]):
        weights, state = w.update(state, torch.tensor(losses), ctx(epoch, epoch))
    assert weights[0] < weights[1] < weights[2]
    assert math.isclose(float(weights.sum()), 3.0, rel_tol=1e-6)


# ---------------------------------------------------------------- GLS


def test_gls_weights_give_the_gradient_of_the_geometric_mean():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)

    def losses():
        return ((model(x) - y) ** 2).mean(dim=0) * scales

    w = build_weighting("gls", {"eps": 0.0}, ["a", "b", "c"])
    weights, _ = w.update(w.init(), losses().detach(), ctx(0))
    ours = torch.autograd.grad((weights * losses()).sum(), list(model.parameters()))
    gls = torch.autograd.grad(losses().prod() ** (1 / 3), list(model.parameters()))
    for a, b in zip(ours, gls, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- RLW


def test_rlw_is_reproducible_from_the_generator_and_sums_to_k():
    w = build_weighting("rlw", {}, ["a", "b", "c"])
    state = w.init()
    losses = torch.ones(3)

    def draw(seed, step=0):
        return w.update(state, losses, ctx(step, generator=torch.Generator().manual_seed(seed)))[0]

    assert torch.equal(draw(7), draw(7))
    draws = torch.stack([draw(seed) for seed in range(400)])
    assert torch.allclose(draws.sum(dim=1), torch.full((400,), 3.0))
    assert len({tuple(d.tolist()) for d in draws}) == 400  # a new distribution every step
    assert (draws > 0).all()
    torch.testing.assert_close(draws.mean(dim=0), torch.ones(3), rtol=0.0, atol=0.1)  # exchangeable: mean 1
    # without a generator the draw is still a pure function of the step
    assert torch.equal(w.update(state, losses, ctx(5))[0], w.update(state, losses, ctx(5))[0])
    assert not torch.equal(w.update(state, losses, ctx(5))[0], w.update(state, losses, ctx(6))[0])


# ---------------------------------------------------------------- FAMO


def test_famo_weights_give_the_gradient_of_its_log_loss_objective():
    torch.manual_seed(0)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    xi = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)

    def losses():
        return torch.stack([(theta**2).sum() * 1e3, (theta - 1).abs().sum(), ((theta + 2) ** 4).sum() * 1e-3])

    gaps = losses().detach() + 1e-8
    z = torch.softmax(xi, dim=0)
    c = (z / gaps).sum()
    ours = torch.autograd.grad((famo_weights(xi, gaps) * losses()).sum(), theta)[0]
    paper = torch.autograd.grad((z * torch.log(losses() + 1e-8) / c).sum(), theta)[0]
    torch.testing.assert_close(ours, paper, rtol=1e-10, atol=1e-14)


def test_famo_logit_gradient_is_the_softmax_vector_jacobian_product():
    xi = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64, requires_grad=True)
    before = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    after = torch.tensor([1.0, 2.9, 0.6], dtype=torch.float64)
    delta = torch.log(before) - torch.log(after)
    expected = torch.autograd.grad(torch.softmax(xi, dim=0), xi, grad_outputs=delta)[0]
    torch.testing.assert_close(famo_logit_grad(xi.detach(), before, after), expected, rtol=1e-12, atol=1e-15)


def _decrease_rates(name, params, use_after_step=True, steps=300, lr=1e-3):
    """Gradient descent on L1 = 1000 (x - 1)^2, L2 = (y + 1)^4 (scales 1000:1, different curvature); returns
    the mean per-step log-loss decrease of each task over the last 240 steps."""
    w = build_weighting(name, params, TASKS)
    state = w.init()
    theta = torch.tensor([3.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)

    def losses():
        return torch.stack([1000 * (theta[0] - 1) ** 2, (theta[1] + 1) ** 4])

    rates = []
    for step in range(steps):
        before = losses()
        weights, state = w.update(state, before.detach(), ctx(step))
        opt.zero_grad()
        (weights * before).sum().backward()
        opt.step()
        with torch.no_grad():
            after = losses()
        if use_after_step and w.after_step is not None:
            state = w.after_step(state, after, ctx(step))
        rates.append(torch.log(before.detach()) - torch.log(after))
    return torch.stack(rates)[60:].mean(dim=0)


def test_famo_decreases_the_losses_at_an_equal_rate():
    """FAMO's claim: every task's log-loss falls at about the same rate. gamma = 0 as in the official toy
    example (the objective does not change, so the logits need no decay)."""
    famo = _decrease_rates("famo", {"gamma": 0.0})
    equal = _decrease_rates("equal", {})
    frozen = _decrease_rates("famo", {"gamma": 0.0}, use_after_step=False)  # logits never learned
    assert (famo > 0).all()
    assert float(famo.max() / famo.min()) < 1.5, famo
    assert float(equal.max() / equal.min()) > 20, equal
    assert float(frozen.max() / frozen.min()) > 3, frozen


# ---------------------------------------------------------------- CoBa


def test_coba_scores_follow_the_paper_formulas():
    history = torch.tensor([[1.0, 2.0], [0.9, 2.2], [0.8, 2.4]], dtype=torch.float64)
    torch.testing.assert_close(convergence_slopes(history), torch.tensor([-0.1, 0.2], dtype=torch.float64))
    # RCS: softmax(2 [-1, -3] / 4) = softmax([-0.5, -1.5])
    rcs = relative_convergence(torch.tensor([-1.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(rcs, torch.tensor([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))], dtype=torch.float64))
    # ACS: N = 2, per-task sums of |slope| [2, 4]: softmax(-2 [1, -2] / [2, 4]) = softmax([-1, 1])
    acs = absolute_convergence(torch.tensor([[-1.0, -2.0], [1.0, -2.0]], dtype=torch.float64))
    torch.testing.assert_close(acs, torch.tensor([1 / (1 + math.exp(2)), 1 / (1 + math.exp(-2))], dtype=torch.float64))
    # DF: steady largest slope -> 1; largest slope turning positive -> 2 softmax([5, -5])[1] = 2 / (1 + e^10)
    assert float(divergence_factor(torch.tensor([-1.0, -1.0], dtype=torch.float64), 5.0)) == 1.0
    df = divergence_factor(torch.tensor([-1.0, 1.0], dtype=torch.float64), 5.0)
    assert math.isclose(float(df), 2 / (1 + math.exp(10)), rel_tol=1e-9)


def test_coba_official_form_follows_the_authors_code():
    """MFTCoder's CoBaStatus.compute_per_task_weight, transcribed by hand for K = 2, tau = 5: alpha_max from the
    largest loss curve, DF without the cap at 1, softmax(K w), and the 1/(10K) floor."""
    history = torch.tensor([[1.0, 0.8], [0.5, 0.7], [0.0, 0.6]], dtype=torch.float64)
    assert math.isclose(float(largest_loss_slope(history)), -0.2, rel_tol=1e-12)  # slope of [1.0, 0.7, 0.6]
    assert math.isclose(float(convergence_slopes(history).max()), -0.1, rel_tol=1e-12)  # the paper's alpha_max

    # the largest slope fell from 1 to -1: DF = 2 softmax(-5 * 2 * [1, -1] / 2)[1] = 2 / (1 + e^-10) > 1
    alpha_max = torch.tensor([1.0, -1.0], dtype=torch.float64)
    df = 2 / (1 + math.exp(-10))
    assert math.isclose(float(divergence_factor(alpha_max, 5.0, cap=False)), df, rel_tol=1e-12)
    assert float(divergence_factor(alpha_max, 5.0)) == 1.0
    # a (slope -1 -> -3) converges faster than b (-1 -> +1): RCS favours b, ACS favours a
    slopes = torch.tensor([[-1.0, -1.0], [-3.0, 1.0]], dtype=torch.float64)
    rcs = [1 / (1 + math.exp(2 * (1 - -3) / 4)), 1 / (1 + math.exp(-2 * (1 - -3) / 4))]  # softmax(2 [-3, 1] / 4)
    acs_logits = [-2 * -3 / 4, -2 * 1 / 2]  # -N alpha_i(t) / sum_j |alpha_i(j)|
    acs = [1 / (1 + math.exp(acs_logits[1] - acs_logits[0])), 1 / (1 + math.exp(acs_logits[0] - acs_logits[1]))]
    mixed = [df * r + (1 - df) * a for r, a in zip(rcs, acs, strict=True)]
    soft = [1 / (1 + math.exp(2 * (mixed[1] - mixed[0]))), 1 / (1 + math.exp(2 * (mixed[0] - mixed[1])))]
    assert min(soft) < 1 / 20  # the floor applies
    expected = torch.tensor([0.9 * v + 1 / 20 for v in soft], dtype=torch.float64)
    torch.testing.assert_close(coba_weights(slopes, alpha_max, 5.0, "official"), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(coba_weights(slopes, alpha_max, 5.0),
                               torch.tensor(rcs, dtype=torch.float64), rtol=1e-12, atol=0)


def test_coba_official_form_keeps_every_weight_above_the_floor_and_damps_divergence():
    out = {}
    for form in ("paper", "official"):
        w = build_weighting("coba", {"warmup_steps": 20, "window": 40, "form": form}, TASKS)
        state, seen = w.init(), []
        for step in range(300):
            weights, state = w.update(state, torch.ones(2), ctx(step, val_losses=lambda s=step: _val_losses(s)))
            seen.append(weights)
        out[form] = torch.stack(seen)
    assert float(out["official"].min()) >= 2 * 1 / 20 - 1e-12  # K * 1/(10K)
    assert float(out["paper"].min()) < 0.1  # the paper's form has no floor
    assert (out["official"][230:, 1] < 0.5).all()  # the diverging task is still damped
    torch.testing.assert_close(out["official"].sum(dim=1), torch.full((300,), 2.0), rtol=1e-5, atol=0)


def _val_losses(step):
    """Task a keeps converging; task b converges slowly, then overfits from step 200 (validation loss rises)."""
    a = math.exp(-step / 150)
    b = 1 - 0.001 * step if step < 200 else 0.8 + 0.002 * (step - 200)
    return torch.tensor([a, b])


def test_coba_damps_a_diverging_task():
    w = build_weighting("coba", {"warmup_steps": 20, "window": 40}, TASKS)
    state = w.init()
    seen = {}
    for step in range(300):
        weights, state = w.update(state, torch.ones(2), ctx(step, val_losses=lambda s=step: _val_losses(s)))
        seen[step] = weights
    assert torch.equal(seen[10], torch.ones(2))  # warm-up
    assert seen[150][1] > 1.0  # converging more slowly than a: more than its equal share (RCS)
    for step in (230, 260, 299):
        assert seen[step][1] < 0.5, (step, seen[step])  # diverging: well below its equal share (DF -> ACS)
        assert seen[step][1] < seen[150][1] - 0.5
    assert all(math.isclose(float(v.sum()), 2.0, rel_tol=1e-5) for v in seen.values())


def test_coba_reads_validation_only_every_val_every_steps():
    calls = []

    def val(step):
        calls.append(step)
        return _val_losses(step)

    w = build_weighting("coba", {"warmup_steps": 0, "window": 5, "val_every": 4}, TASKS)
    state, out = w.init(), []
    for step in range(20):
        weights, state = w.update(state, torch.ones(2), ctx(step, val_losses=lambda s=step: val(s)))
        out.append(weights)
    assert calls == [0, 4, 8, 12, 16]
    assert all(torch.equal(out[step], out[step - step % 4]) for step in range(20))  # held between readings
    assert not torch.equal(out[8], out[12])
    assert state["history"].shape == (5, 2)


def test_coba_without_validation_losses_is_a_clear_error():
    w = build_weighting("coba", {}, TASKS)
    with pytest.raises(ConfigError, match=r"coba.*validation"):
        w.update(w.init(), torch.ones(2), ctx(0))
