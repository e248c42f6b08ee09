"""DSelect-k (Hazimeh et al. 2021, NeurIPS): the smooth-step, the binary-encoded selectors and the gate recomputed
by hand, saturated selectors pick exactly their experts, the static variant meets the architecture contract, its
parameter-only regularisers, refusals by key, construction from YAML / build_model / the class."""

import math

import pytest
import torch

from polytask.aggregators.base import stateless
from polytask.config import load_config
from polytask.engine.loop import task_losses
from polytask.engine.step import Method, train_step
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.models.backbones import build_backbone
from polytask.models.dselect_k import DSelectK, binary_codes, selectors, smooth_step
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]


def small(seed: int = 0, **params) -> DSelectK:
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [7]}, "dselect_k",
                        {"n_experts": 4, "k": 2, "expert_hidden": [5], **params})
    assert isinstance(model, DSelectK)
    return model


def experts_by_hand(model: DSelectK, h: torch.Tensor) -> list[torch.Tensor]:
    n = model.experts.n_experts
    return [torch.relu(h @ model.experts.weights[0][i] + model.experts.biases[0][i]) for i in range(n)]


def test_smooth_step_is_the_papers_cubic_between_flat_ends():
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.3, 1.0, 7.0], requires_grad=True)
    s = smooth_step(t, gamma)
    cubic = [-2 / gamma**3 * v**3 + 3 / (2 * gamma) * v + 0.5 for v in (-0.5, 0.0, 0.3)]
    torch.testing.assert_close(s, torch.tensor([0.0, 0.0, cubic[0], 0.5, cubic[2], 1.0, 1.0]))
    (slope,) = torch.autograd.grad(s.sum(), t)
    # S'(t) = 3/(2 gamma) - 6 t^2 / gamma^3: zero at t = +-gamma/2 (continuously differentiable) and outside
    want = [0.0, 0.0, 3 / (2 * gamma) - 6 * 0.25 / gamma**3, 3 / (2 * gamma), 3 / (2 * gamma) - 6 * 0.09 / gamma**3,
            0.0, 0.0]
    torch.testing.assert_close(slope, torch.tensor(want))


def test_binary_codes_are_most_significant_bit_first():
    assert binary_codes(4).int().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert binary_codes(5).shape == (5, 3)
    assert binary_codes(5)[4].int().tolist() == [1, 0, 0]
    assert binary_codes(2).int().tolist() == [[0], [1]]


def test_a_single_expert_selector_is_the_product_over_its_bits():
    z = torch.tensor([[0.1, -0.2]])
    s1, s2 = smooth_step(z[0, 0], 1.0), smooth_step(z[0, 1], 1.0)
    r = selectors(z, binary_codes(4), 1.0)[0]
    want = torch.stack([(1 - s1) * (1 - s2), (1 - s1) * s2, s1 * (1 - s2), s1 * s2])
    torch.testing.assert_close(r, want)
    torch.testing.assert_close(r.sum(), torch.tensor(1.0))  # n a power of two: a distribution over the experts


def test_per_example_output_recomputed_from_the_equations():
    model = small(gamma=0.5)
    with torch.no_grad():  # selectors off their starting plateau, so every bit matters
        for t in TASKS:
            model.gates[t.name].z.weight.normal_(0, 0.3)
            model.gates[t.name].alpha.weight.normal_(0, 1.0)
    x = torch.randn(11, 6)
    out = model(x)
    h = model.encoder(x)
    f = experts_by_hand(model, h)
    for t in TASKS:
        gate = model.gates[t.name]
        z = (h @ gate.z.weight.T + gate.z.bias).reshape(11, 2, 2)  # k = 2 selectors, m = 2 bits
        alpha = torch.softmax(h @ gate.alpha.weight.T + gate.alpha.bias, dim=-1)
        s = smooth_step(z, 0.5)
        q = torch.zeros(11, 4)
        for i in range(2):
            for j in range(4):
                b1, b2 = j >> 1 & 1, j & 1
                r = (s[:, i, 0] if b1 else 1 - s[:, i, 0]) * (s[:, i, 1] if b2 else 1 - s[:, i, 1])
                q[:, j] += alpha[:, i] * r
        torch.testing.assert_close(q.sum(-1), torch.ones(11))
        torch.testing.assert_close(out[t.name], model.heads[t.name](sum(q[:, j:j + 1] * f[j] for j in range(4))))


def _saturate(model: DSelectK, task: str, experts: list[int]) -> None:
    """Set a static gate's selector i on the code of ``experts[i]``, beyond the smooth-step's cubic region."""
    gamma = model.gates[task].gamma
    codes = binary_codes(model.experts.n_experts)
    with torch.no_grad():
        for i, j in enumerate(experts):
            model.gates[task].z_logits[i] = torch.where(codes[j], gamma, -gamma)


def test_saturated_selectors_select_exactly_their_experts():
    """k selectors on experts j_1 .. j_k: q = softmax(alpha) on those experts and exactly zero elsewhere; k = 1 is
    a hard choice of one expert."""
    model = small(gate="static", n_experts=8, k=2)
    _saturate(model, "a", [5, 2])
    q = model.gates["a"]()
    w = torch.softmax(model.gates["a"].alpha_logits, dim=0)
    want = torch.zeros(8)
    want[5], want[2] = w[0], w[1]
    assert torch.equal(q == 0, want == 0)
    torch.testing.assert_close(q, want)

    one = small(gate="static", n_experts=8, k=1)
    _saturate(one, "b", [6])
    x = torch.randn(5, 6)
    h = one.encoder(x)
    assert one.gates["b"]().tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    torch.testing.assert_close(one(x)["b"], one.heads["b"](experts_by_hand(one, h)[6]))


def test_the_static_variant_meets_the_architecture_contract():
    """Static gates with both parameter-only regularisers (5 experts, entropy on): features give the forward bit for
    bit, the parameters split into shared and per-task sets matching where gradients flow, and a summing aggregator
    gives the summed loss's gradient (with the aux loss) in both gradient modes."""
    model = small(gate="static", n_experts=5, entropy_reg=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    y = {"a": torch.randint(0, 3, (12,), generator=g).float(), "b": torch.randn(12, generator=g),
         "c": torch.randint(0, 2, (12,), generator=g).float()}
    src, rows = [TaskData(x, y)], [torch.arange(12)]
    feats = model.features(x)
    assert len(feats) == 1 and feats[0].shape == (12, 5, 5)
    out = model(x)
    assert all(torch.equal(a, b) for a, b in zip(model.outputs(feats).values(), out.values(), strict=True))
    own = {t.name: list(model.task_parameters(t.name)) for t in TASKS}
    for t in TASKS:
        grads = torch.autograd.grad(out[t.name].square().sum(), [p for ps in own.values() for p in ps],
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
        it = iter(grads)
        for u, ps in own.items():
            for _ in ps:
                assert bool(next(it).abs().sum() > 0) == (u == t.name)
    every = {id(p) for p in model.parameters()}
    listed = [id(p) for p in model.shared_parameters()] + [i for ps in own.values() for i in map(id, ps)]
    assert sorted(listed) == sorted(every)
    for mode in ("params", "representation"):
        summed = Method("sum", "aggregator", stateless(lambda g: torch.ones(g.shape[0], dtype=g.dtype), "gramian"),
                        mode=mode)
        model.zero_grad()
        train_step(model, summed, summed.init(), src, rows, TASKS, torch.optim.SGD(model.parameters(), lr=0.0),
                   StepContext(0, 0), task_losses)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        (task_losses(model, src, rows, TASKS).sum() + model.aux_loss()).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n, mode=mode: f"{mode} {n}: {m}")


def test_static_regularisers_recomputed_by_hand():
    """entropy_reg * sum -r log(r + 1e-6) over every task's selectors, plus sum 1 / sum_j r_j when the number of
    experts is not a power of two; per-example gates and a plain static gate on 4 experts have none."""
    model = small(gate="static", n_experts=3, k=2, entropy_reg=0.25)
    codes = binary_codes(3)
    entropy = penalty = torch.tensor(0.0)
    for t in TASKS:
        s = smooth_step(model.gates[t.name].z_logits, 1.0)
        for i in range(2):
            r = torch.stack([torch.prod(torch.where(codes[j], s[i], 1 - s[i])) for j in range(3)])
            entropy = entropy - (r * torch.log(r + 1e-6)).sum()
            penalty = penalty + 1 / r.sum()
    assert penalty > 6  # 2 x 3 selectors, each with weight on the code of no expert (3 = 0b11)
    torch.testing.assert_close(model.aux_loss(), 0.25 * entropy + penalty)
    assert small(gate="static").aux_loss() is None
    assert small().aux_loss() is None


@pytest.mark.parametrize(("params", "key"), [
    ({"n_experts": 3}, r"n_experts: per-example DSelect-k gates need a power of two"),
    ({"entropy_reg": 0.1}, r"entropy_reg: the entropy regulariser of per-example gates depends on the input"),
    ({"k": 5}, r"k: 5 selectors for 4 experts"),
    ({"gamma": 0.0}, r"gamma"),
    ({"gate": "dynamic"}, r"gate"),
    ({"n_experts": 1}, r"n_experts"),
])
def test_bad_parameters_are_refused_by_name(params, key):
    with pytest.raises(ConfigError, match=rf"model\.architecture_params\.{key}"):
        small(**params)


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [7]}\n  architecture: dselect_k\n"
                    "  architecture_params: {n_experts: 4, k: 2, expert_hidden: [5]}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [7]}, (6,))
    direct = DSelectK(encoder, width, TASKS, 4, 2, [5], 1.0, True, 0.0)
    for other in (direct, small()):
        assert other.state_dict().keys() == from_yaml.state_dict().keys()
        for k, v in from_yaml.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)
    assert math.isclose(from_yaml.gates["a"].gamma, 1.0)
