"""Properties every loss weighting shares: explicit state that checkpoints and resumes exactly, finite weights
at any loss scale, registry entries with strict typed parameters."""

import copy
import math

import pytest
import torch

from polytask.engine import checkpoint
from polytask.errors import ConfigError
from polytask.methods import load_all
from polytask.weighting import StepContext, build_weighting
from polytask.weighting._adam import adam_init, adam_step

TASKS = ["a", "b"]
# parameters that make every code path run within a few steps (CoBa leaves warm-up at step 2); a case is a
# registered name, or name[variant] for another form of the same method, checked by every property here
PARAMS = {
    "equal": {}, "static": {"weights": {"a": 1.0, "b": 2.0}}, "uw": {}, "imtl_l": {}, "dwa": {}, "gls": {},
    "rlw": {}, "famo": {}, "coba": {"warmup_steps": 2, "window": 4},
    "coba[official]": {"warmup_steps": 2, "window": 4, "form": "official"},
}
CASES = sorted(PARAMS)
NAMES = sorted({case.partition("[")[0] for case in CASES})


def build(case):
    return build_weighting(case.partition("[")[0], PARAMS[case], TASKS)


def make_ctx(step, losses, val=None):
    val = val if val is not None else losses * 1.1 + 0.01 * step
    return StepContext(step, step // 3, losses, lambda: val, steps_per_epoch=3,
                       generator=torch.Generator().manual_seed(1000 + step))


def toy_losses(step, scale=1.0):
    g = torch.Generator().manual_seed(step)
    return (torch.exp(torch.randn(2, generator=g)) * scale).float()


def advance(w, state, step, losses, val=None):
    """One loop step as the engine runs it: update, then after_step with the losses after the step."""
    ctx = make_ctx(step, losses, val)
    weights, state = w.update(state, losses, ctx)
    if w.after_step is not None:
        state = w.after_step(state, losses * 0.97, ctx)
    return weights, state


def same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("case", CASES)
def test_state_round_trips_through_a_checkpoint_and_resumes_identically(case, tmp_path):
    w = build(case)
    straight, state = [], w.init()
    for step in range(12):
        weights, state = advance(w, state, step, toy_losses(step))
        straight.append(weights)

    resumed, state2 = [], w.init()
    for step in range(12):
        if step == 6:
            checkpoint.save(tmp_path / "state.safetensors", {"method": state2})
            state2 = checkpoint.load(tmp_path / "state.safetensors")["method"]
        weights, state2 = advance(w, state2, step, toy_losses(step))
        resumed.append(weights)

    assert all(torch.equal(x, y) for x, y in zip(straight, resumed, strict=True))
    assert same_tree(state, state2)


@pytest.mark.parametrize("case", CASES)
def test_update_does_not_modify_the_state_it_is_given(case):
    w = build(case)
    state = w.init()
    for step in range(5):
        before = copy.deepcopy(state)
        _, new = advance(w, state, step, toy_losses(step))
        assert same_tree(state, before)
        state = new


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("losses", [[1e-8, 1e-8], [1e8, 1e8], [1e-8, 1e8], [0.0, 1.0], [0.0, 0.0]])
def test_weights_are_finite_nonnegative_and_in_the_loss_dtype_at_any_scale(case, losses):
    w = build(case)
    state = w.init()
    base = torch.tensor(losses, dtype=torch.float32)
    for step in range(40):
        loss = base * (1 + 0.1 * math.sin(step))
        weights, state = advance(w, state, step, loss, val=loss)
        assert weights.shape == (2,) and weights.dtype == torch.float32
        assert torch.isfinite(weights).all() and (weights >= 0).all(), (step, weights)


def test_every_weighting_here_is_registered_with_typed_params_and_a_paper():
    registry = load_all()
    for name in NAMES:
        entry = registry.get(name)
        assert entry.extra["kind"] == "weighting" and entry.paper
        assert entry.params.model_config.get("extra") == "forbid"
    assert registry.get("coba").extra.get("needs_val") is True
    assert not registry.get("famo").extra.get("needs_val")


def test_unknown_param_is_an_error_that_suggests_the_key():
    with pytest.raises(ConfigError, match=r"tempreature.*did you mean 'temperature'"):
        build_weighting("dwa", {"tempreature": 3.0}, TASKS)
    with pytest.raises(ConfigError, match="lr"):
        build_weighting("uw", {"lr": -1.0}, TASKS)


def test_adam_matches_torch_adam_with_weight_decay():
    p = torch.nn.Parameter(torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.05, weight_decay=0.01)
    x, state = p.detach().clone(), adam_init(p.detach())
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        grad = torch.randn(3, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        x, state = adam_step(x, grad, state, lr=0.05, weight_decay=0.01)
    torch.testing.assert_close(x, p.detach(), rtol=1e-12, atol=1e-14)
