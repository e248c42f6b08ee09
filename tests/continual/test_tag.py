"""TAG (Malviya, Ravindran & Chandar 2022): the update against a hand-rolled re-computation of the paper's formulas,
plain RMSProp on the first experience, α's behaviour for aligned / orthogonal / opposed gradients, the refusal of
weight decay, and runs in the task and class scenarios whatever the configured optimiser."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.tag import TAG, TAGParams, tag_alphas, tag_step
from polytask.errors import ConfigError
from polytask.flows.continual import continual


class _Two(nn.Module):
    """Two parameter tensors of different shapes (TAG's α is per parameter tensor)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 4, generator=g))
        self.b = nn.Parameter(torch.randn(3, generator=g))


def _tag(model, experiences, optimizer, **params):
    tag = TAG(TAGParams(**params))
    tag.begin(SimpleNamespace(experiences=list(range(experiences))), 0)
    run = SimpleNamespace(model=model, optimizer=optimizer)
    tag.init(run)
    return tag, run


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a.ravel() @ b.ravel() / (na * nb))


def test_update_equals_the_papers_formulas_recomputed_by_hand():
    """Two experiences of three steps with given gradients (the second experience's partly aligned with the
    first's): every parameter after every step equals a float64 re-computation of M, V, α = exp(−b cos) (exp(−b)
    for the current experience) and θ ← θ − η g / (sqrt(Σ α V) + ε), α per parameter tensor."""
    lr, b, beta1, beta2, eps = 0.01, 2.0, 0.9, 0.99, 1e-8
    model = _Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # ignored: TAG applies its own update
    tag, run = _tag(model, 2, opt, lr=lr, b=b)
    gen = torch.Generator().manual_seed(1)
    base = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    theta = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    M = {n: [np.zeros(p.shape), np.zeros(p.shape)] for n, p in model.named_parameters()}
    V = {n: [np.zeros(p.shape), np.zeros(p.shape)] for n, p in model.named_parameters()}
    for t in range(2):
        tag.begin(SimpleNamespace(experiences=[0, 1]), t)
        for _ in range(3):
            grads = {n: (base[n] if t == 0 else 0.5 * base[n]) + torch.randn(base[n].shape, generator=gen)
                     for n in base}
            opt.zero_grad(set_to_none=True)
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            tag.before_update(run, None)
            opt.step()
            for n in theta:
                g = grads[n].double().numpy()
                M[n][t] = beta1 * M[n][t] + (1 - beta1) * g
                V[n][t] = beta2 * V[n][t] + (1 - beta2) * g ** 2
                alphas = [math.exp(-b * _cos(M[n][t], M[n][tau])) for tau in range(t)] + [math.exp(-b)] \
                    if t else [1.0]
                theta[n] = theta[n] - lr * g / (np.sqrt(sum(a * v for a, v in zip(alphas, V[n], strict=False)))
                                                + eps)
                np.testing.assert_allclose(dict(model.named_parameters())[n].detach().double().numpy(), theta[n],
                                           rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # cleared: the configured optimiser left them alone
    for n in theta:  # the state holds each experience's moments
        np.testing.assert_allclose(tag.first[n].double().numpy(), np.stack(M[n]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(tag.second[n].double().numpy(), np.stack(V[n]), rtol=1e-5, atol=1e-9)


def test_the_first_experience_is_rmsprop_bit_for_bit_whatever_the_optimiser():
    """No earlier experience: TAG's rule is RMSProp (the paper; the reference code's α = [1]); with the run's
    optimiser SGD with momentum, the parameters equal torch.optim.RMSprop(lr=η, alpha=β2, eps=ε)'s exactly."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    tag, run = _tag(a, 3, opt_a, lr=0.01)
    opt_b = torch.optim.RMSprop(b.parameters(), lr=0.01, alpha=0.99, eps=1e-8)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            if model is a:
                tag.before_update(run, None)
            opt.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
    assert not opt_a.state  # SGD never stepped a parameter: no momentum buffer exists


def test_alpha_shrinks_the_step_as_the_gradients_diverge_from_an_earlier_experiences():
    """α(t, τ) = exp(−b cos): aligned accumulated gradients give e^{−b}, orthogonal ones 1, opposed ones e^{b}; with
    the same |g| the step is η|g| / (sqrt(α V^(τ) + e^{−b} V^(t)) + ε), so largest when aligned."""
    b, lr = 3.0, 0.1
    params = TAGParams(lr=lr, b=b)
    u = torch.tensor([1.0, 1.0])
    earlier_first, earlier_second = u[None], torch.full((1, 2), 0.04)
    zero = torch.zeros(2)
    expected = {"aligned": math.exp(-b), "orthogonal": 1.0, "opposed": math.exp(b)}
    steps = {}
    for case, g in {"aligned": u, "orthogonal": torch.tensor([1.0, -1.0]), "opposed": -u}.items():
        first, _, denominator = tag_step(g, zero, zero, earlier_first, earlier_second, params)
        alphas = tag_alphas(first, earlier_first, b)
        assert alphas.tolist() == pytest.approx([expected[case], math.exp(-b)], rel=1e-6)
        want = math.sqrt(expected[case] * 0.04 + math.exp(-b) * (1 - params.beta2)) + params.eps
        assert denominator.tolist() == pytest.approx([want, want], rel=1e-6)
        steps[case] = float((lr * g.abs() / denominator)[0])
    assert steps["aligned"] > steps["orthogonal"] > steps["opposed"]
    # b = 0: no weighting, the experiences' second moments add up whatever the angle
    for g in (u, -u, torch.tensor([1.0, -1.0])):
        _, _, d = tag_step(g, zero, zero, earlier_first, earlier_second, TAGParams(b=0.0))
        assert d.tolist() == pytest.approx([math.sqrt(0.04 + 0.01) + 1e-8] * 2, rel=1e-6)


def test_a_zero_accumulated_gradient_has_no_direction():
    """An earlier experience that never moved a parameter (a head it did not train) has M = 0 and V = 0: its cosine
    counts as 0 (α = 1) and it adds nothing to the denominator; the step stays finite."""
    g = torch.tensor([0.3, -0.2, 0.1])
    alphas = tag_alphas(g, torch.zeros(1, 3), 4.0)
    assert alphas.tolist() == pytest.approx([1.0, math.exp(-4.0)])
    _, second, d = tag_step(g, torch.zeros(3), torch.zeros(3), torch.zeros(1, 3), torch.zeros(1, 3), TAGParams(b=4.0))
    assert torch.allclose(d, (math.exp(-4.0) * second).sqrt() + 1e-8) and torch.isfinite(d).all()
    assert torch.isfinite(tag_alphas(torch.zeros(3), torch.zeros(2, 3), 4.0)).all()


def test_weight_decay_is_refused_with_the_key_named():
    model = _Two()
    with pytest.raises(ConfigError, match=r"train\.optimizer\.weight_decay"):
        _tag(model, 2, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))


def _config(tmp_path, scenario, name, optimizer, lr):
    return ContinualConfig.model_validate({
        "seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": scenario}},
        "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 0, "optimizer": optimizer},
        "strategies": [{"name": "tag", "params": {"lr": lr}}], "output": {"dir": str(tmp_path), "name": name}})


@pytest.mark.parametrize(("scenario", "lr"), [("task", 1e-3), ("class", 3e-3)])
def test_runs_in_the_task_and_class_scenarios_whatever_the_configured_optimiser(tmp_path, scenario, lr):
    """Split-digits in each scenario: every experience is learnt, the state is two moments per experience and
    trainable parameter, and the run is the same with SGD + momentum or Adam configured (TAG's update alone).
    (A new task's head has no earlier moments, so its step is e^{b/2} times RMSProp's: the task scenario wants the
    smaller η.)"""
    _, sgd = continual(_config(tmp_path, scenario, "sgd", {"name": "sgd", "lr": 0.1, "momentum": 0.9}, lr))
    _, adam = continual(_config(tmp_path, scenario, "adam", {"name": "adam", "lr": 0.5}, lr))
    a, b = sgd["results"]["tag"][0], adam["results"]["tag"][0]
    assert a["accuracy"] == b["accuracy"]
    r = np.asarray(a["accuracy"])
    assert r.shape == (5, 5) and np.all(np.diag(r) > 0.8), r
    from polytask.continual import build_stream
    from polytask.models import build_model

    stream = build_stream("split-digits", {"scenario": scenario}, seed=0)
    model = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [32]}, "hard", {})
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert a["state_numel"] == 2 * 5 * n_params
