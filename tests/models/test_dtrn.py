"""DTRN (Liu et al. 2023, CIKM): the output recomputed by hand from the hypernetwork-generated interest layer (TIM)
and the SENet-like gate (TRM); special cases (equal task embeddings share an interest, a zero excitation halves
the representation); each task reads only its own interest; built from YAML, from ``build_model`` and from the
class. The shared suite runs with ``-k dtrn`` in test_architectures.py."""

from __future__ import annotations

import pytest
import torch

from polytask.config import load_config
from polytask.models import build_model
from polytask.models.backbones import build_backbone
from polytask.models.dtrn import DTRN, DTRNParams
from polytask.tasks import Task

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]
REP, INTEREST = 7, 4


def small(seed: int = 0, **params) -> DTRN:
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [REP]}, "dtrn",
                        {"embedding_dim": 3, "interest_dim": INTEREST, "reduction": 2, **params})
    assert isinstance(model, DTRN)
    return model


def linear(layer: torch.nn.Linear, z: torch.Tensor) -> torch.Tensor:
    return z @ layer.weight.T + layer.bias


def hypernetwork_by_hand(model: DTRN, e: torch.Tensor) -> torch.Tensor:
    layers = [m for m in model.hypernetwork if isinstance(m, torch.nn.Linear)]
    for layer in layers[:-1]:
        e = torch.relu(linear(layer, e))
    return linear(layers[-1], e)


@pytest.mark.parametrize("hyper_hidden", [[], [5]])
def test_outputs_follow_tim_and_trm(hyper_hidden):
    """[vec W_t; b_t] = H(e_t); u_t = ReLU(h W_t + b_t); z = [h; u_t];
    y_t = head_t(sigmoid(A ReLU(B z + c) + d) * z)."""
    model = small(hyper_hidden=hyper_hidden).eval()
    x = torch.randn(11, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        h = model.encoder(x)
        for k, t in enumerate(TASKS):
            g = hypernetwork_by_hand(model, model.task_embeddings[k])
            w, b = g[:REP * INTEREST].reshape(REP, INTEREST), g[REP * INTEREST:]
            z = torch.cat([h, torch.relu(h @ w + b)], dim=1)
            first, _, second, _ = model.gates[t.name]
            gate = torch.sigmoid(linear(second, torch.relu(linear(first, z))))
            assert first.out_features == -(-(REP + INTEREST) // 2)
            torch.testing.assert_close(out[t.name], model.heads[t.name](gate * z), rtol=1e-5, atol=1e-6)


def test_tasks_with_equal_embeddings_share_their_interest():
    model = small()
    with torch.no_grad():
        model.task_embeddings[2] = model.task_embeddings[0]
    _, interests = model.features(torch.randn(5, 6, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(interests[:, 2], interests[:, 0], rtol=0, atol=0)
    assert not torch.allclose(interests[:, 1], interests[:, 0])


def test_a_hypernetwork_without_task_dependence_gives_one_shared_interest_layer():
    """Zero generator weights: W_t = the generator's bias for every task (a shared bottom's extra layer)."""
    model = small()
    with torch.no_grad():
        model.hypernetwork[-1].weight.zero_()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    h, interests = model.features(x)
    bias = model.hypernetwork[-1].bias
    want = torch.relu(h @ bias[:REP * INTEREST].reshape(REP, INTEREST) + bias[REP * INTEREST:])
    for k in range(len(TASKS)):
        torch.testing.assert_close(interests[:, k], want, rtol=0, atol=1e-6)


def test_a_zero_excitation_halves_the_bottom_representation():
    model = small().eval()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for gate in model.gates.values():
            gate[2].weight.zero_()
            gate[2].bias.zero_()
        h, interests = model.features(x)
        out = model(x)
        for k, t in enumerate(TASKS):
            z = torch.cat([h, interests[:, k]], dim=1)
            torch.testing.assert_close(out[t.name], model.heads[t.name](z / 2), rtol=0, atol=0)


def test_each_task_reads_only_its_own_interest():
    model = small()
    h, interests = (f.detach().requires_grad_() for f in model.features(torch.randn(8, 6)))
    model.outputs([h, interests], ["b"])["b"].sum().backward()
    per_task = interests.grad.abs().sum(dim=(0, 2))
    assert per_task[1] > 0 and per_task[0] == 0 and per_task[2] == 0
    assert h.grad.abs().sum() > 0


def test_the_hypernetwork_is_smaller_than_one_interest_layer_per_task():
    """Parameter efficiency: with embedding_dim + 1 < K, the generator costs less than K separate layers."""
    tasks = [Task(f"t{i}", "regression", 1) for i in range(8)]
    model = build_model(tasks, (6,), "mlp", {"hidden": [16]}, "dtrn", {"embedding_dim": 4, "interest_dim": 8})
    generator = sum(p.numel() for p in model.hypernetwork.parameters()) + model.task_embeddings.numel()
    assert generator < len(tasks) * (16 * 8 + 8)


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  backbone: mlp\n  backbone_params: {{hidden: [{REP}]}}\n  architecture: dtrn\n"
                    f"  architecture_params: {{embedding_dim: 3, interest_dim: {INTEREST}, reduction: 2}}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [REP]}, (6,))
    direct = DTRN(encoder, width, TASKS, DTRNParams(embedding_dim=3, interest_dim=INTEREST, reduction=2))
    for other in (direct, small()):
        assert other.state_dict().keys() == from_yaml.state_dict().keys()
        for k, v in from_yaml.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)
