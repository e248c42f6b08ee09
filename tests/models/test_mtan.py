"""MTAN (Liu, Johns & Davison 2019, CVPR): Eq. (1)-(2) recomputed by hand on a lenet encoder (1x1 convs, batch norm
with non-trivial statistics) and on an mlp encoder (Linear attention); a mask of ones is the shared bottom; the
parameter split; built from YAML, from ``build_model`` and from the class. The shared suite runs with ``-k mtan`` in
test_architectures.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.models import HardSharing, build_model
from polytask.models.backbones import build_backbone
from polytask.models.mtan import MTAN
from polytask.tasks import Task

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1)]
LENET = ("lenet", {"channels": [3, 4], "hidden": 5}, (1, 8, 8))
MLP = ("mlp", {"hidden": [6, 4]}, (5,))


def small(setup=LENET, seed: int = 0, **params) -> MTAN:
    torch.manual_seed(seed)
    model = build_model(TASKS, setup[2], setup[0], setup[1], "mtan", params)
    assert isinstance(model, MTAN)
    return model


def x_of(shape: tuple[int, ...], n: int = 6, seed: int = 2) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def randomise_norms(model: nn.Module, seed: int = 1) -> None:
    """Batch norms with statistics and affine parameters away from the identity (eval mode uses them)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))


def bn(x: Tensor, m: nn.Module) -> Tensor:
    """Batch norm at inference, written out: (x - mean) / sqrt(var + eps) * gamma + beta over dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(shape)
            + m.bias.view(shape))


def pointwise(x: Tensor, layer: nn.Module) -> Tensor:
    """A 1x1 conv (or Linear) as a sum over input channels, without bias (it is followed by batch norm)."""
    w = layer.weight.reshape(layer.weight.shape[0], layer.weight.shape[1])
    return torch.einsum("oc,nc...->no...", w, x)


def mask(x: Tensor, block: nn.Sequential) -> Tensor:
    """a = sigmoid(BN(h · relu(BN(g · x)))): the paper's attention block, from its weights."""
    return torch.sigmoid(bn(pointwise(F.relu(bn(pointwise(x, block[0]), block[1])), block[3]), block[4]))


def test_lenet_outputs_follow_eq_1_and_2_by_hand():
    model = small().eval()
    randomise_norms(model)
    x = x_of((1, 8, 8))
    enc = model.encoder
    p1 = F.relu(F.max_pool2d(F.conv2d(x, enc[0].weight, enc[0].bias, padding=2), 2))
    p2 = F.relu(F.max_pool2d(F.conv2d(p1, enc[3].weight, enc[3].bias, padding=2), 2))
    p3 = F.relu(F.linear(p2.flatten(1), enc[7].weight, enc[7].bias))
    out = model(x)
    for t in ("a", "b"):
        m, f = model.masks[t], model.extract[t]
        a1 = p1 * mask(p1, m[0])                                            # Eq. 1 with a^(1) = h(g(u^(1)))
        f2 = F.relu(F.max_pool2d(F.conv2d(a1, f[0][0].weight, f[0][0].bias, padding=2), 2))
        a2 = p2 * mask(torch.cat([p2, f2], 1), m[1])                       # Eq. 2: [u^(2); f^(2)(â^(1))]
        f3 = F.relu(F.linear(a2.flatten(1), f[1][1].weight, f[1][1].bias))
        a3 = p3 * mask(torch.cat([p3, f3], 1), m[2])
        torch.testing.assert_close(out[t], model.heads[t](a3), rtol=1e-5, atol=1e-6)


def test_mlp_encoder_gets_linear_attention_by_hand():
    """batch_norm: false: g and h are Linear layers with biases, a = sigmoid(h(relu(g(x))))."""
    model = small(MLP, batch_norm=False).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    x = x_of((5,))
    enc = model.encoder
    p1 = F.relu(F.linear(x, enc[0].weight, enc[0].bias))
    p2 = F.relu(F.linear(p1, enc[2].weight, enc[2].bias))
    out = model(x)
    for t in ("a", "b"):
        m, f = model.masks[t], model.extract[t]

        def att(v, blk):
            return torch.sigmoid(F.linear(F.relu(F.linear(v, blk[0].weight, blk[0].bias)), blk[2].weight,
                                          blk[2].bias))
        a1 = p1 * att(p1, m[0])
        f2 = F.relu(F.linear(a1, f[0][0].weight, f[0][0].bias))
        a2 = p2 * att(torch.cat([p2, f2], 1), m[1])
        torch.testing.assert_close(out[t], model.heads[t](a2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setup", [LENET, MLP], ids=["lenet", "mlp"])
def test_a_mask_of_ones_is_the_shared_bottom(setup):
    """With every h's batch norm set to output 50 (sigmoid(50) rounds to 1 in float32), â^(J) = p^(J): the model is
    hard sharing with the same encoder and heads, in training mode too."""
    model = small(setup)
    for blocks in model.masks.values():
        for blk in blocks:
            with torch.no_grad():
                blk[4].weight.zero_()
                blk[4].bias.fill_(50.0)
    hard = HardSharing(model.encoder, model.heads["a"].in_features, TASKS)
    hard.heads.load_state_dict(model.heads.state_dict())
    x = x_of(setup[2])
    for t, y in hard(x).items():
        torch.testing.assert_close(model(x)[t], y, rtol=0, atol=0)


def test_features_are_the_stage_outputs_and_every_task_reads_them_all():
    model = small().eval()
    feats = model.features(x_of((1, 8, 8)))
    assert [tuple(f.shape) for f in feats] == [(6, 3, 4, 4), (6, 4, 2, 2), (6, 5)]
    assert all(model.reads(t) is None for t in ("a", "b"))


def test_the_encoder_is_shared_and_the_attention_is_the_tasks_own():
    model = small()
    assert [id(p) for p in model.shared_parameters()] == [id(p) for p in model.encoder.parameters()]
    for t in ("a", "b"):
        own = {id(p) for p in model.task_parameters(t)}
        want = {id(p) for mod in (model.masks[t], model.extract[t], model.heads[t]) for p in mod.parameters()}
        assert own == want
    assert len(model.masks["a"]) == 3 and len(model.extract["a"]) == 2  # f^(j) for j >= 2
    # no bias before a batch norm; the 1x1 convs of stage j: g (C_in -> C_j), h (C_j -> C_j)
    assert model.masks["a"][1][0].bias is None and model.masks["a"][1][0].weight.shape == (4, 8, 1, 1)


def test_a_frozen_encoder_leaves_the_tasks_blocks_trainable():
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [6, 4]}, (5,))
    encoder.requires_grad_(False)
    model = MTAN(encoder, width, TASKS)
    assert not list(model.shared_parameters())
    assert all(p.requires_grad for t in ("a", "b") for p in model.task_parameters(t))


def test_an_encoder_that_is_not_sequential_is_refused_naming_the_backbone():
    with pytest.raises(ConfigError, match=r"model\.backbone: architecture 'mtan'"):
        MTAN(nn.Linear(5, 3), 3, TASKS)


def test_a_stage_of_unknown_width_is_refused_naming_the_backbone():
    enc = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Flatten(), nn.Linear(5, 3), nn.ReLU())
    with pytest.raises(ConfigError, match=r"model\.backbone: .*stage 0"):
        MTAN(enc, 3, TASKS)


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: lenet\n  backbone_params: {channels: [3, 4], hidden: 5}\n"
                    "  architecture: mtan\n  architecture_params: {batch_norm: false}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (1, 8, 8), mc.backbone, mc.backbone_params, mc.architecture,
                            mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone(*LENET)
    direct = MTAN(encoder, width, TASKS, batch_norm=False)
    assert isinstance(from_yaml, MTAN)
    assert direct.state_dict().keys() == from_yaml.state_dict().keys()
    for k, v in from_yaml.state_dict().items():
        torch.testing.assert_close(direct.state_dict()[k], v, rtol=0, atol=0)


def test_categorical_inputs_are_embedded_in_the_shared_encoder():
    """A table with a categorical column: the embeddings are shared (part of the encoder, below the features), and
    with masks of ones the model is hard sharing with the embedded encoder."""
    pytest.importorskip("polytask.models.embedding")
    torch.manual_seed(0)
    model = build_model(TASKS, (5,), "mlp", {"hidden": [6, 4]}, "mtan", {}, categorical={1: 4}, embedding_dim=2)
    assert isinstance(model, MTAN)
    x = x_of((5,))
    x[:, 1] = torch.tensor([0.0, 1, 2, 3, 1, 2])
    assert {id(p) for p in model.encoder.embeddings.parameters()} <= {id(p) for p in model.shared_parameters()}
    for blocks in model.masks.values():
        for blk in blocks:
            with torch.no_grad():
                blk[4].weight.zero_()
                blk[4].bias.fill_(50.0)
    hard = HardSharing(model.encoder, 4, TASKS)
    hard.heads.load_state_dict(model.heads.state_dict())
    for t, y in hard(x).items():
        torch.testing.assert_close(model(x)[t], y, rtol=0, atol=0)
