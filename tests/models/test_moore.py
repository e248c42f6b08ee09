"""MOORE (Hendawy, Peters & D'Eramo 2024, ICLR): the Gram-Schmidt process gives orthonormal expert representations
per input and passes gradients; the output is head_c(tanh(w_c^T GS(U))) recomputed by hand; special cases; built
from YAML, from ``build_model`` and from the class. The shared suite runs with ``-k moore`` in
test_architectures.py."""

from __future__ import annotations

import pytest
import torch

from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.models.backbones import build_backbone
from polytask.models.moore import MOORE, MOOREParams, gram_schmidt
from polytask.tasks import Task

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1)]


def small(seed: int = 0, **params) -> MOORE:
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [16]}, "moore",
                        {"n_experts": 3, "expert_hidden": [8], "expert_dim": 5, **params})
    assert isinstance(model, MOORE)
    return model


def gram(v: torch.Tensor) -> torch.Tensor:
    return v @ v.transpose(1, 2)


def qr_rows(u: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt by another road: the Q of U^T = QR with R's diagonal made positive (unique for full rank)."""
    q, r = torch.linalg.qr(u.transpose(1, 2))
    return (q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)).transpose(1, 2)


def test_gram_schmidt_rows_are_orthonormal_per_input():
    u = torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(0))
    v = gram_schmidt(u)
    assert v.shape == u.shape
    torch.testing.assert_close(gram(v), torch.eye(6).expand(32, 6, 6), rtol=0, atol=1e-5)


def test_the_models_expert_representations_are_orthonormal_per_input():
    model = small()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    (v,) = model.features(x)
    assert v.shape == (20, 3, 5)
    torch.testing.assert_close(gram(v), torch.eye(3).expand(20, 3, 3), rtol=0, atol=1e-5)


def test_gram_schmidt_equals_qr_with_a_positive_diagonal():
    u = torch.randn(10, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gram_schmidt(u), qr_rows(u), rtol=0, atol=1e-12)


def test_gram_schmidt_keeps_the_flag_of_subspaces():
    """v_i lies in span(u_1..u_i) and v_i . u_i > 0: Gram-Schmidt, not any orthonormal basis."""
    u = torch.randn(5, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = gram_schmidt(u)
    for i in range(3):
        coef = torch.linalg.lstsq(u[:, :i + 1].transpose(1, 2), v[:, i].unsqueeze(-1)).solution
        torch.testing.assert_close((u[:, :i + 1].transpose(1, 2) @ coef).squeeze(-1), v[:, i])
        assert ((v[:, i] * u[:, i]).sum(-1) > 0).all()


def test_gram_schmidt_leaves_an_orthonormal_set_as_it_is():
    q = qr_rows(torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(gram_schmidt(q), q, rtol=0, atol=1e-12)


def test_gradients_pass_through_gram_schmidt():
    u = torch.randn(3, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(gram_schmidt, (u,))
    model = small()
    out = model(torch.randn(8, 6, generator=torch.Generator().manual_seed(6)))
    out["a"].sum().backward()
    for name, p in model.experts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


def test_a_dependent_expert_gives_a_zero_vector_not_nan():
    u = torch.tensor([[[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], requires_grad=True)
    v = gram_schmidt(u)
    torch.testing.assert_close(v[0, 1], torch.zeros(3))
    torch.testing.assert_close(v[0, 2], torch.tensor([0.0, 1.0, 0.0]))
    v.sum().backward()
    assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("activation", ["tanh", "linear"])
def test_outputs_follow_the_papers_equations(activation):
    """y_c = head_c(act(sum_i w_{c,i} v_i)), V = GS([u_1(h) .. u_k(h)]) with every expert run on its own."""
    model = small(activation=activation).eval()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        h = model.encoder(x)
        w0, w1 = model.experts.weights
        b0, b1 = model.experts.biases
        u = torch.stack([torch.relu(h @ w0[i] + b0[i]) @ w1[i] + b1[i] for i in range(3)], dim=1)
        v = qr_rows(u.double()).float()
        out = model(x)
        for t in ("a", "b"):
            mix = sum(model.task_weights[t][i] * v[:, i] for i in range(3))
            want = model.heads[t](torch.tanh(mix) if activation == "tanh" else mix)
            torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


def test_one_expert_is_a_shared_bottom_on_the_normalised_expert():
    model = small(n_experts=1).eval()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        u = model.experts(model.encoder(x))[:, 0]
        v = u / u.norm(dim=1, keepdim=True)
        out = model(x)
        for t in ("a", "b"):
            torch.testing.assert_close(out[t], model.heads[t](torch.tanh(model.task_weights[t][0] * v)))


def test_task_weights_start_like_the_reference_task_encoder():
    model = small(n_experts=4, expert_dim=8)
    bound = (6.0 / (4 + len(TASKS))) ** 0.5
    for t in ("a", "b"):
        assert model.task_weights[t].shape == (4,) and model.task_weights[t].abs().max() <= bound


def test_more_experts_than_dimensions_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.architecture_params\.n_experts"):
        build_model(TASKS, (6,), "mlp", {"hidden": [16]}, "moore", {"n_experts": 6, "expert_dim": 5})


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [16]}\n  architecture: moore\n"
                    "  architecture_params: {n_experts: 3, expert_hidden: [8], expert_dim: 5}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [16]}, (6,))
    direct = MOORE(encoder, width, TASKS, MOOREParams(n_experts=3, expert_hidden=[8], expert_dim=5))
    small_model = small()
    for other in (direct, small_model):
        assert other.state_dict().keys() == from_yaml.state_dict().keys()
        for k, v in from_yaml.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)
