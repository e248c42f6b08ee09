"""Function classes (Garg et al. 2022): shapes, determinism, curriculum zeroing, each class's definition, and the
out-of-distribution prompts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.errors import ConfigError
from polytask.icl.functions import (
    FUNCTION_CLASSES,
    DecisionTree,
    LinearRegression,
    NoisyLinearRegression,
    Relu2nnRegression,
    SparseLinearRegression,
    SplitPrompts,
    build_function_class,
    noisy_labels,
    orthant_shift,
    random_orthant,
    scaled_inputs,
)
from polytask.icl.prompts import Prompts

NAMES = FUNCTION_CLASSES.names()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_garg_class_is_registered():
    assert NAMES == ["decision_tree", "linear_regression", "noisy_linear_regression", "relu_2nn_regression",
                     "sparse_linear_regression"]


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(NAMES), batch=st.integers(1, 5), n=st.integers(1, 9), d=st.integers(3, 8),
       seed=st.integers(0, 2**31))
def test_shapes_and_determinism(name, batch, n, d, seed):
    family = build_function_class(name, {"dim": d})
    a, b = family.sample(gen(seed), batch, n), family.sample(gen(seed), batch, n)
    assert a.xs.shape == (batch, n, d) and a.ys.shape == (batch, n)
    assert a.xs.dtype == a.ys.dtype == torch.float32
    assert torch.equal(a.xs, b.xs) and torch.equal(a.ys, b.ys)
    if a.ws is not None:
        assert a.ws.shape == (batch, d) and torch.equal(a.ws, b.ws)
    c = family.sample(gen(seed + 1), batch, n)
    assert not torch.equal(a.xs, c.xs)


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(NAMES), active=st.integers(1, 6))
def test_curriculum_zeroes_the_last_coordinates(name, active):
    family = build_function_class(name, {"dim": 6, **({"sparsity": 1} if name.startswith("sparse") else {})})
    p = family.sample(gen(1), 4, 5, dim=active)
    assert (p.xs[:, :, active:] == 0).all() and (p.xs[:, :, :active] != 0).all()


def test_curriculum_dimension_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"linear_regression.*dim must be in 1\.\.4, got 5"):
        LinearRegression(dim=4).sample(gen(), 2, 3, dim=5)


def test_linear_labels_are_w_dot_x_with_standard_normal_w():
    p = LinearRegression(dim=5).sample(gen(2), 4000, 3)
    torch.testing.assert_close(p.ys, torch.einsum("bnd,bd->bn", p.xs, p.ws))
    assert abs(p.ws.mean().item()) < 0.05 and abs(p.ws.var().item() - 1) < 0.05
    assert abs(p.xs.var().item() - 1) < 0.05
    small = LinearRegression(dim=5).sample(gen(2), 4, 3)
    scaled = LinearRegression(dim=5, scale=3.0).sample(gen(2), 4, 3)
    torch.testing.assert_close(scaled.ys, 3 * small.ys)


def test_sparse_w_has_k_nonzeros_among_the_active_coordinates():
    p = SparseLinearRegression(dim=10, sparsity=3).sample(gen(3), 50, 4, dim=6)
    assert ((p.ws != 0).sum(1) == 3).all() and (p.ws[:, 6:] == 0).all()
    torch.testing.assert_close(p.ys, torch.einsum("bnd,bd->bn", p.xs, p.ws))
    with pytest.raises(ConfigError, match=r"sparsity must be in 1\.\.2"):
        SparseLinearRegression(dim=10, sparsity=3).sample(gen(), 2, 3, dim=2)


def test_noisy_labels_have_the_stated_noise():
    p = NoisyLinearRegression(dim=4, noise_std=0.5).sample(gen(4), 2000, 10)
    residual = p.ys - torch.einsum("bnd,bd->bn", p.xs, p.ws)
    assert abs(residual.std().item() - 0.5) < 0.01
    clean = NoisyLinearRegression(dim=4, noise_std=0.0).sample(gen(4), 3, 5)
    torch.testing.assert_close(clean.ys, torch.einsum("bnd,bd->bn", clean.xs, clean.ws))


def test_relu_network_matches_a_hand_written_forward():
    family = Relu2nnRegression(dim=3, hidden=7)
    params = family.draw(gen(5), 2)
    xs = torch.randn(2, 4, 3, generator=gen(6))
    want = torch.stack([torch.relu(xs[b] @ params["w1"][b]) @ params["w2"][b] for b in range(2)]) * math.sqrt(2 / 7)
    torch.testing.assert_close(family.apply(params, xs), want)
    # The sqrt(2/h) factor keeps E[y^2] = E|x|^2 (linear regression's label scale), as Garg et al.'s renormalisation.
    p = Relu2nnRegression(dim=5, hidden=100).sample(gen(7), 2000, 5)
    assert abs(p.ys.square().mean().item() - 5) < 0.5


def test_decision_tree_matches_a_recursive_walk():
    family = DecisionTree(dim=4, depth=3)
    params = family.draw(gen(8), 3)
    xs = torch.randn(3, 6, 4, generator=gen(9))

    def walk(b: int, x: torch.Tensor) -> float:
        node = 0
        for _ in range(3):
            node = 2 * node + (2 if x[params["coords"][b, node]] > 0 else 1)
        return float(params["values"][b, node])

    want = torch.tensor([[walk(b, xs[b, i]) for i in range(6)] for b in range(3)])
    torch.testing.assert_close(family.apply(params, xs), want)
    assert params["coords"].shape == (3, 15)


def test_scaled_inputs_scale_the_inputs_of_the_same_functions():
    family = LinearRegression(dim=4)
    plain = family.sample(gen(10), 3, 5)
    scaled = family.sample_split(gen(10), 3, 5, scaled_inputs(2.5))
    assert isinstance(scaled, Prompts)
    torch.testing.assert_close(scaled.xs, 2.5 * plain.xs)
    torch.testing.assert_close(scaled.ys, 2.5 * plain.ys)


def test_orthant_shift_puts_context_and_query_in_opposite_orthants():
    split = DecisionTree(dim=5).sample_split(gen(11), 6, 8, orthant_shift())
    assert isinstance(split, SplitPrompts)
    signs = split.context.xs.sign()
    assert (signs == signs[:, :1]).all()  # every context point of a prompt lies in its one orthant
    assert torch.equal(split.query.xs, -split.context.xs)
    family = DecisionTree(dim=5)
    params = family.draw(gen(11), 6)  # the same draws as the split's: parameters come first
    torch.testing.assert_close(split.query.ys, family.apply(params, split.query.xs))
    mixed = split.at(3)
    assert torch.equal(mixed.xs[:, :3], split.context.xs[:, :3]) and torch.equal(mixed.xs[:, 3:], split.query.xs[:, 3:])
    assert torch.equal(mixed.ys[:, 3], split.query.ys[:, 3])


def test_random_orthant_keeps_the_query_points_in_distribution():
    split = LinearRegression(dim=3).sample_split(gen(12), 4, 6, random_orthant())
    signs = split.context.xs.sign()
    assert (signs == signs[:, :1]).all() and not (split.query.xs.sign() == signs[:, :1]).all()
    torch.testing.assert_close(split.context.xs.abs(), split.query.xs.abs())


def test_noisy_label_transform_adds_noise_of_the_given_std_and_nothing_else():
    p = LinearRegression(dim=3).sample(gen(13), 1000, 10)
    q = noisy_labels(p, gen(14), 0.3)
    assert torch.equal(q.xs, p.xs) and torch.equal(q.ws, p.ws)
    assert abs((q.ys - p.ys).std().item() - 0.3) < 0.01


def test_unknown_class_and_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'linear_regression'"):
        build_function_class("linear_regresion")
    with pytest.raises(ConfigError, match=r"icl\.task\.params\.sparsity"):
        build_function_class("sparse_linear_regression", {"sparsity": 0}, where="icl.task.params")
