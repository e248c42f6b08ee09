"""Task-MoE (Kudugunta et al. 2021, Findings of EMNLP): outputs recomputed from the routing equations, the round-robin
start, only routed experts computed and trained, the dense special case (k = E), the load-balancing losses by hand,
the balancing gradient reaching the routers through the engine's train_step, construction and refusals."""

import pytest
import torch

from polytask.config import MethodConfig, load_config
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method, train_step
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.models.backbones import build_backbone
from polytask.models.task_moe import TaskMoE, importance_balance, switch_balance
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]


def small(seed: int = 0, tasks=TASKS, **params) -> TaskMoE:
    torch.manual_seed(seed)
    model = build_model(tasks, (6,), "mlp", {"hidden": [7]}, "task_moe",
                        {"n_experts": 4, "top_k": 2, "expert_hidden": [5], **params})
    assert isinstance(model, TaskMoE)
    return model


def expert_by_hand(model: TaskMoE, e: int, h: torch.Tensor) -> torch.Tensor:
    return torch.relu(h @ model.experts.weights[0][e] + model.experts.biases[0][e])


def set_logits(model: TaskMoE, **logits: list[float]) -> None:
    with torch.no_grad():
        for t, v in logits.items():
            model.routers[t].copy_(torch.tensor(v))


def test_each_output_is_the_tower_on_the_tasks_top_k_experts():
    model = small()
    set_logits(model, a=[0.3, -1.0, 2.0, 0.1], b=[1.5, 1.4, -0.2, 0.0], c=[-0.5, 0.2, 0.1, 0.9])
    chosen = {"a": [2, 0], "b": [0, 1], "c": [3, 1]}
    assert {t: r.tolist() for t, r in model.routes().items()} == chosen
    assert model.used() == [0, 1, 2, 3]
    x = torch.randn(10, 6)
    out = model(x)
    h = model.encoder(x)
    for t, experts in chosen.items():
        logits = model.routers[t][experts]
        w = torch.exp(logits) / torch.exp(logits).sum()  # softmax over the chosen experts' logits
        mixture = sum(w[i] * expert_by_hand(model, e, h) for i, e in enumerate(experts))
        torch.testing.assert_close(out[t], model.heads[t](mixture))


def test_routing_starts_round_robin_so_every_expert_is_used():
    model = small()
    assert {t: sorted(r.tolist()) for t, r in model.routes().items()} == {"a": [0, 1], "b": [2, 3], "c": [0, 1]}
    assert model.used() == [0, 1, 2, 3]
    assert small(n_experts=6, top_k=2).used() == [0, 1, 2, 3, 4, 5]


def test_only_the_routed_experts_are_computed_and_trained():
    model = small(n_experts=8, top_k=1, renormalize=False)
    set_logits(model, a=[0, 0, 0, 0, 0, 3, 0, 0], b=[0, 0, 2, 0, 0, 0, 0, 0], c=[0, 0, 0, 0, 0, 1, 0, 0])
    x = torch.randn(6, 6)
    feats = model.features(x)
    assert model.used() == [2, 5] and len(feats) == 2
    assert (model.reads("a"), model.reads("b"), model.reads("c")) == ([1], [0], [1])
    out = model(x)
    sum(o.square().sum() for o in out.values()).backward()
    for w in model.experts.weights:
        used = w.grad.flatten(1).abs().sum(1) > 0
        assert used.tolist() == [e in (2, 5) for e in range(8)]
    # k = 1 without renormalisation: the weight is p_e, so the task loss still reaches the router (Switch)
    assert model.routers["a"].grad.abs().sum() > 0


def test_top_k_of_all_experts_is_a_dense_task_gated_mixture():
    model = small(top_k=4)
    set_logits(model, a=[0.3, -1.0, 2.0, 0.1])
    x = torch.randn(5, 6)
    h = model.encoder(x)
    p = torch.softmax(model.routers["a"], dim=0)
    mixture = sum(p[e] * expert_by_hand(model, e, h) for e in range(4))
    torch.testing.assert_close(model(x, ["a"])["a"], model.heads["a"](mixture))


def test_switch_balance_recomputed_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    chosen = torch.tensor([[0, 1], [3, 2]])
    f = torch.tensor([0.25, 0.25, 0.25, 0.25])  # each expert holds one of the 4 slots
    P = probs.mean(0)
    torch.testing.assert_close(switch_balance(probs, chosen), 4 * (f * P).sum())
    lopsided = torch.tensor([[0, 1], [0, 1]])
    torch.testing.assert_close(switch_balance(probs, lopsided), 4 * (0.5 * P[0] + 0.5 * P[1]))
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(switch_balance(uniform, torch.tensor([[0], [1], [2]])), torch.tensor(1.0))


def test_importance_balance_is_the_squared_coefficient_of_variation():
    weights = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5]])
    imp = torch.tensor([0.6, 0.9, 0.5])
    cv2 = ((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2
    torch.testing.assert_close(importance_balance(weights), cv2)
    assert float(importance_balance(torch.full((2, 3), 1 / 3))) == 0.0


@pytest.mark.parametrize("balance", ["switch", "importance"])
def test_aux_loss_is_computed_from_the_router_parameters(balance):
    model = small(balance=balance, balance_coef=0.5)
    set_logits(model, a=[0.3, -1.0, 2.0, 0.1], b=[1.5, 1.4, -0.2, 0.0], c=[-0.5, 0.2, 0.1, 0.9])
    logits = torch.stack([model.routers[t] for t in "abc"])
    chosen = torch.tensor([[2, 0], [0, 1], [3, 1]])
    if balance == "switch":
        want = 0.5 * switch_balance(torch.softmax(logits, 1), chosen)
    else:
        w = torch.zeros(3, 4)
        for j in range(3):
            w[j, chosen[j]] = torch.softmax(logits[j, chosen[j]], 0)
        want = 0.5 * importance_balance(w)
    torch.testing.assert_close(model.aux_loss(), want)
    assert small(balance_coef=0.0).aux_loss() is None


@pytest.mark.parametrize(("method", "mode"), [("equal", "params"), ("upgrad", "params"), ("upgrad", "representation")])
def test_the_balancing_loss_reaches_the_routers_through_train_step(method, mode):
    """Two engine steps (lr 0) from the same model, with and without the balancing loss: the gradients differ by
    exactly the aux loss's gradient, which is non-zero on every router and zero on everything else."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g)
    y = {"a": torch.randint(0, 3, (16,), generator=g).float(), "b": torch.randn(16, generator=g),
         "c": torch.randint(0, 2, (16,), generator=g).float()}
    src, rows = [TaskData(x, y)], [torch.arange(16)]
    m = build_method(MethodConfig(name=method, grad_mode=mode), [t.name for t in TASKS])
    grads = {}
    for coef in (0.0, 0.5):
        model = small(balance_coef=coef)
        train_step(model, m, m.init(), src, rows, TASKS, torch.optim.SGD(model.parameters(), lr=0.0),
                   StepContext(0, 0), task_losses)
        grads[coef] = {n: p.grad.clone() for n, p in model.named_parameters()}
    names = dict(model.named_parameters())
    aux = dict(zip(names, torch.autograd.grad(model.aux_loss(), list(names.values()), allow_unused=True,
                                              materialize_grads=True), strict=True))
    for n in names:
        torch.testing.assert_close(grads[0.5][n] - grads[0.0][n], aux[n], msg=n)
        assert bool(aux[n].abs().sum() > 0) == n.startswith("routers."), n


def test_built_from_yaml_from_build_model_and_from_the_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [7]}\n  architecture: task_moe\n"
                    "  architecture_params: {n_experts: 4, top_k: 2, expert_hidden: [5]}\n")
    mc = load_config(path).model
    torch.manual_seed(0)
    from_yaml = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    torch.manual_seed(0)
    encoder, width = build_backbone("mlp", {"hidden": [7]}, (6,))
    direct = TaskMoE(encoder, width, TASKS, 4, 2, [5], True, "switch", 0.01)
    for other in (direct, small()):
        assert other.state_dict().keys() == from_yaml.state_dict().keys()
        for k, v in from_yaml.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(("params", "key"), [({"top_k": 5}, r"top_k: 5 experts per task out of 4"),
                                             ({"balance": "gshard"}, "balance"), ({"balance_coef": -1}, "balance_coef"),
                                             ({"n_experts": 0}, "n_experts")])
def test_bad_parameters_are_refused_by_name(params, key):
    with pytest.raises(ConfigError, match=rf"model\.architecture_params\.{key}"):
        small(**params)
