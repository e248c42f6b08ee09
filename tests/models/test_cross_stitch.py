"""Cross-stitch networks (Misra et al. 2016, CVPR): Eq. (1) recomputed by hand through two columns; the paper's
initialisation; special cases (identity units = independent columns; at initialisation, with equal columns and
convex units, the network is the shared bottom); per-channel units; the parameter split; built from YAML, from
``build_model`` and from the class. The shared suite runs with ``-k cross_stitch`` in test_architectures.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.models import HardSharing, build_model
from polytask.models.backbones import build_backbone
from polytask.models.cross_stitch import CrossStitch, cross_stitch, stitch_init
from polytask.tasks import Task

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1)]


def small(seed: int = 0, backbone: str = "mlp", **params) -> CrossStitch:
    torch.manual_seed(seed)
    bparams, shape = ({"hidden": [4, 3]}, (5,)) if backbone == "mlp" else ({"channels": [3], "hidden": 4}, (1, 4, 4))
    model = build_model(TASKS, shape, backbone, bparams, "cross_stitch", params)
    assert isinstance(model, CrossStitch)
    return model


def perturb(model: CrossStitch, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.alphas, *model.last_alpha.values()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def x_of(n: int = 7, shape: tuple[int, ...] = (5,), seed: int = 2) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_init_is_the_papers_convex_combination():
    torch.testing.assert_close(stitch_init(3, 0.9), torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                                                  [0.05, 0.05, 0.9]]))
    torch.testing.assert_close(stitch_init(2, 0.7), torch.tensor([[0.7, 0.3], [0.3, 0.7]]))
    torch.testing.assert_close(stitch_init(1, 0.9), torch.ones(1, 1))
    model = small(alpha_self=0.8)
    assert len(model.alphas) == 1  # two stages: one shared unit, then the per-task rows of the last
    torch.testing.assert_close(model.alphas[0].detach(), stitch_init(2, 0.8))
    torch.testing.assert_close(model.last_alpha["a"].detach(), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(model.last_alpha["b"].detach(), torch.tensor([0.2, 0.8]))


def test_outputs_follow_eq_1_through_two_columns_by_hand():
    """h1_k = relu(W1_k x + b1_k); m_t = Σ_s A[t,s] h1_s; h2_k = relu(W2_k m_k + b2_k);
    y_t = head_t(Σ_s a_t[s] h2_s)."""
    model = small().eval()
    perturb(model)
    x = x_of()
    cols = model.columns
    h1 = [F.relu(F.linear(x, c[0].weight, c[0].bias)) for c in cols]
    a = model.alphas[0].detach()
    m = [a[t, 0] * h1[0] + a[t, 1] * h1[1] for t in range(2)]
    h2 = [F.relu(F.linear(m[k], c[2].weight, c[2].bias)) for k, c in enumerate(cols)]
    out = model(x)
    for t in ("a", "b"):
        r = model.last_alpha[t].detach()
        want = model.heads[t](r[0] * h2[0] + r[1] * h2[1])
        torch.testing.assert_close(out[t], want, rtol=1e-6, atol=1e-6)


def test_per_channel_units_mix_each_channel_with_its_own_matrix():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 3, 5, 5, generator=g)  # N, K, C, H, W
    alpha = torch.randn(3, 2, 2, generator=g)  # C, T, K
    want = torch.stack([torch.stack([sum(alpha[c, t, s] * x[:, s, c] for s in range(2)) for c in range(3)], 1)
                        for t in range(2)], 1)
    torch.testing.assert_close(cross_stitch(alpha, x), want, rtol=1e-6, atol=1e-6)
    per_stage = torch.randn(2, 2, generator=g)
    torch.testing.assert_close(cross_stitch(per_stage.expand(3, 2, 2), x), cross_stitch(per_stage, x),
                               rtol=1e-6, atol=1e-6)


def test_per_channel_units_on_a_conv_encoder():
    """lenet: units (C, K, K) after the conv block and (hidden, K, K) after the dense layer; at the same values as
    the per-stage units they give the same outputs, and perturbed ones differ."""
    x = x_of(6, (1, 4, 4))
    per_stage, per_channel = small(backbone="lenet").eval(), small(backbone="lenet", per_channel=True).eval()
    assert per_channel.alphas[0].shape == (3, 2, 2) and per_channel.last_alpha["a"].shape == (4, 2)
    for t, y in per_stage(x).items():
        torch.testing.assert_close(per_channel(x)[t], y, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        per_channel.alphas[0][1, 0, 1] += 0.5
    assert not torch.allclose(per_channel(x)["a"], per_stage(x)["a"])


def test_identity_units_are_independent_columns():
    """alpha_self = 1: task t's output is head_t(column_t(x)), and task a's loss reaches no weight of column b."""
    model = small(alpha_self=1.0)
    x = x_of()
    out = model(x)
    for k, t in enumerate(("a", "b")):
        torch.testing.assert_close(out[t], model.heads[t](model.columns[k](x)), rtol=0, atol=0)
    other, mine = list(model.columns[1].parameters()), list(model.columns[0].parameters())
    grads = torch.autograd.grad(out["a"].sum(), other + mine)
    assert all(bool((g == 0).all()) for g in grads[:len(other)])
    assert all(bool(g.abs().sum() > 0) for g in grads[len(other):])


@pytest.mark.parametrize("alpha_self", [0.9, 0.5])
def test_at_init_equal_columns_and_convex_units_are_the_shared_bottom(alpha_self):
    """Every column starts as the encoder and every unit's row sums to 1, so each mix is the encoder's activation:
    the network starts as hard sharing with the same encoder and heads."""
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [4, 3]}, (5,))
    model = CrossStitch(encoder, width, TASKS, alpha_self)
    hard = HardSharing(encoder, width, TASKS)
    hard.heads.load_state_dict(model.heads.state_dict())
    x = x_of()
    for t, y in hard(x).items():
        torch.testing.assert_close(model(x)[t], y, rtol=1e-6, atol=1e-6)


def test_the_last_units_rows_are_the_tasks_own_and_the_rest_is_shared():
    model = small()
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.columns.parameters()} | {id(p) for p in model.alphas} == shared
    for t in ("a", "b"):
        own = [id(p) for p in model.task_parameters(t)]
        assert own[0] == id(model.last_alpha[t]) and not set(own) & shared


def test_a_frozen_encoder_gives_frozen_columns_and_trainable_units():
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [4, 3]}, (5,))
    encoder.requires_grad_(False)
    model = CrossStitch(encoder, width, TASKS)
    assert list(model.shared_parameters()) == list(model.alphas)


def test_per_channel_needs_stage_widths():
    with pytest.raises(ConfigError, match=r"model\.architecture_params\.per_channel: .* stage 0"):
        CrossStitch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(
            5, 3), torch.nn.ReLU()), 3, TASKS, per_channel=True)


def test_a_module_encoder_that_is_not_sequential_is_refused():
    with pytest.raises(ConfigError, match=r"model\.backbone: architecture 'cross_stitch'"):
        CrossStitch(torch.nn.Linear(5, 3), 3, TASKS)


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [4, 3]}\n  architecture: cross_stitch\n"
                    "  architecture_params: {alpha_self: 0.8, per_channel: true}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (5,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [4, 3]}, (5,))
    direct = CrossStitch(encoder, width, TASKS, alpha_self=0.8, per_channel=True)
    assert isinstance(from_yaml, CrossStitch)
    assert direct.state_dict().keys() == from_yaml.state_dict().keys()
    for k, v in from_yaml.state_dict().items():
        torch.testing.assert_close(direct.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"model\.architecture_params.*alpha_self"):
        build_model(TASKS, (5,), "mlp", {"hidden": [4]}, "cross_stitch", {"alpha_self": 1.5})


def test_categorical_inputs_are_embedded_in_every_columns_first_stage():
    """A table with a categorical column: each column embeds the codes (its embeddings are shared parameters), and
    at initialisation the network is hard sharing with the embedded encoder."""
    pytest.importorskip("polytask.models.embedding")
    torch.manual_seed(0)
    model = build_model(TASKS, (5,), "mlp", {"hidden": [4, 3]}, "cross_stitch", {}, categorical={1: 4},
                        embedding_dim=2)
    assert isinstance(model, CrossStitch)
    x = x_of()
    x[:, 1] = torch.tensor([0.0, 1, 2, 3, 1, 2, 3])
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for col in model.columns for p in col.embeddings.parameters())
    hard = HardSharing(model.columns[0], 3, TASKS)
    hard.heads.load_state_dict(model.heads.state_dict())
    for t, y in hard(x).items():
        torch.testing.assert_close(model(x)[t], y, rtol=1e-6, atol=1e-6)
