"""MMoE (Ma et al. 2018, KDD, Section 4.2): the output recomputed by hand, one expert is a shared bottom with one more
layer, construction from YAML / build_model / the class, bad parameters named."""

import pytest
import torch
from torch import nn

from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.models import HardSharing, build_model
from polytask.models.backbones import build_backbone
from polytask.models.mmoe import MMoE
from polytask.tasks import Task
from polytask.tasks.task import HeadSpec

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1, head=HeadSpec((4,)))]


def small(seed: int = 0, **params) -> MMoE:
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [7]}, "mmoe", {"n_experts": 3, "expert_hidden": [5], **params})
    assert isinstance(model, MMoE)
    return model


def by_hand_expert(model: MMoE, i: int, h: torch.Tensor) -> torch.Tensor:
    """Expert i as its own Linear+ReLU layers (a loop over its layers, no stacking)."""
    z = h
    for w, b in zip(model.experts.weights, model.experts.biases, strict=True):
        z = torch.relu(z @ w[i] + b[i])
    return z


def test_each_output_is_the_towers_gated_mixture_of_the_experts():
    model = small(expert_hidden=[6, 5])
    x = torch.randn(10, 6)
    out = model(x)
    h = model.encoder(x)
    f = [by_hand_expert(model, i, h) for i in range(3)]
    for t in TASKS:
        g = torch.softmax(h @ model.gates[t.name].weight.T, dim=-1)  # g^k(h) = softmax(W_gk h)
        assert torch.allclose(g.sum(-1), torch.ones(10))
        mixture = sum(g[:, i:i + 1] * f[i] for i in range(3))  # f^k(h) = sum_i g^k(h)_i f_i(h)
        torch.testing.assert_close(out[t.name], model.heads[t.name](mixture))


def test_one_expert_is_a_shared_bottom_with_one_more_layer():
    """With one expert every gate is 1: the model is hard sharing on the encoder followed by the expert."""
    model = small(n_experts=1)
    expert = nn.Linear(7, 5)
    with torch.no_grad():
        expert.weight.copy_(model.experts.weights[0][0].T)
        expert.bias.copy_(model.experts.biases[0][0])
    hard = HardSharing(nn.Sequential(model.encoder, expert, nn.ReLU()), 5, TASKS)
    hard.heads.load_state_dict(model.heads.state_dict())
    x = torch.randn(9, 6)
    h = model.encoder(x)
    for t in TASKS:
        assert torch.equal(model.gate(t.name, h), torch.ones(9, 1))
    want, got = hard(x), model(x)
    for t in TASKS:
        torch.testing.assert_close(got[t.name], want[t.name])


def test_the_gates_read_the_representation_and_the_experts():
    model = small()
    feats = model.features(torch.randn(4, 6))
    assert [tuple(f.shape) for f in feats] == [(4, 7), (4, 3, 5)]
    assert model.reads("a") is None  # both features
    assert model.aux_loss() is None  # the paper has no auxiliary loss


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [7]}\n  architecture: mmoe\n"
                    "  architecture_params: {n_experts: 3, expert_hidden: [5]}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [7]}, (6,))
    direct = MMoE(encoder, width, TASKS, 3, [5])
    for other in (direct, small()):
        assert other.state_dict().keys() == from_yaml.state_dict().keys()
        for k, v in from_yaml.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(("params", "key"), [({"n_experts": 0}, "n_experts"), ({"expert_hidden": []}, "expert_hidden"),
                                             ({"expert_hidden": [0]}, "expert_hidden")])
def test_bad_parameters_are_refused_by_name(params, key):
    with pytest.raises(ConfigError, match=rf"model\.architecture_params\.{key}"):
        build_model(TASKS, (6,), "mlp", {"hidden": [7]}, "mmoe", params)
