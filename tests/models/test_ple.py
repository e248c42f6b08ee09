"""CGC and PLE (Tang et al. 2020, RecSys) against their equations recomputed by hand, one expert and one task at a
time; their special cases; and the shared/per-task partition in the engine's sense (a task's own parameters are
exactly those only its loss reaches), which in PLE makes the lower levels' task experts shared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_summing_aggregator_gives_summed_loss, expert_by_hand, tasks_reaching, three_task_batch
from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.models.ple import CGC, PLE
from polytask.tasks import Task

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]
NAMES = [t.name for t in TASKS]


batch = three_task_batch
expert = expert_by_hand


def gate(linear: nn.Linear, x: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """softmax(W x + b) weighted sum of the experts (Eq. 2-3), one expert at a time."""
    w = torch.softmax(x @ linear.weight.T + linear.bias, dim=-1)
    assert w.shape[1] == len(experts)
    return sum(w[:, e:e + 1] * f for e, f in enumerate(experts))


def by_hand(model: PLE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """PLE by Eq. 2-7: task k's experts read g^{k,j-1}, shared experts g^{s,j-1}; task k's gate reads g^{k,j-1} and
    mixes [k's experts, shared experts]; the shared gate (below the last level) mixes every expert of the level in
    the order [task 1's, ..., task T's, shared]; the tower reads g^{k,N}."""
    h = model.encoder(x)
    t, k, s = len(NAMES), model.k, model.s
    inputs, shared_in = dict.fromkeys(NAMES, h), h
    for level in model.lower:
        own = {n: [expert(level.experts, i * k + j, inputs[n]) for j in range(k)] for i, n in enumerate(NAMES)}
        shared = [expert(level.experts, t * k + j, shared_in) for j in range(s)]
        new = {n: gate(level.gates[n], inputs[n], own[n] + shared) for n in NAMES}
        shared_in = gate(level.shared_gate, shared_in, [f for n in NAMES for f in own[n]] + shared)
        inputs = new
    shared = [expert(model.shared_experts, j, shared_in) for j in range(s)]
    return {n: model.heads[n](gate(model.gates[n], inputs[n],
                                   [expert(model.task_experts[n], j, inputs[n]) for j in range(k)] + shared))
            for n in NAMES}


VARIANTS = [
    ("cgc", {"shared_experts": 1, "task_experts": 1, "expert_hidden": [4]}),
    ("cgc", {"shared_experts": 3, "task_experts": 2, "expert_hidden": [6, 4]}),
    ("ple", {"levels": 2, "shared_experts": 2, "task_experts": 1, "expert_hidden": [5]}),
    ("ple", {"levels": 3, "shared_experts": 1, "task_experts": 2, "expert_hidden": [6, 4]}),
    ("ple", {"levels": 4, "shared_experts": 2, "task_experts": 3, "expert_hidden": [4]}),
]


def make(name: str, params: dict, seed: int = 0) -> PLE:
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [8, 5]}, name, params)
    assert isinstance(model, PLE)
    return model


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_the_forward_is_the_papers_equations(name, params):
    model = make(name, params)
    x = batch()[0][0].x
    want, got = by_hand(model, x), model(x)
    for n in NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_cgc_on_any_encoder_from_python():
    """The class itself on a user's encoder: tower_k(softmax(W_k h) [E_k(h), E_s(h)]) (Eq. 2-5)."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 7), nn.Tanh())
    model = CGC(encoder, 7, TASKS, shared_experts=2, task_experts=3, expert_hidden=[5])
    x = batch()[0][0].x
    h = encoder(x)
    for n in NAMES:
        experts = [expert(model.task_experts[n], j, h) for j in range(3)]
        experts += [expert(model.shared_experts, j, h) for j in range(2)]
        torch.testing.assert_close(model(x, [n])[n], model.heads[n](gate(model.gates[n], h, experts)))


def test_ple_with_one_level_is_cgc():
    p = {"shared_experts": 2, "task_experts": 2, "expert_hidden": [4]}
    cgc, ple = make("cgc", p), make("ple", {**p, "levels": 1})
    assert type(cgc) is CGC and cgc.levels == 1
    a, b = cgc.state_dict(), ple.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)
    x = batch()[0][0].x
    for n in NAMES:
        assert torch.equal(cgc(x)[n], ple(x)[n])


def test_a_gate_saturated_on_one_expert_gives_that_expert():
    """Task k's selection is [k's experts, shared experts] (Eq. 4): a gate whose logit favours entry m_k by 60
    gives the tower the first shared expert alone."""
    model = make("cgc", {"shared_experts": 2, "task_experts": 2, "expert_hidden": [4]})
    x = batch()[0][0].x
    with torch.no_grad():
        model.gates["b"].weight.zero_()
        model.gates["b"].bias.copy_(torch.tensor([0.0, 0.0, 60.0, 0.0]))
    h = model.encoder(x)
    torch.testing.assert_close(model(x, ["b"])["b"], model.heads["b"](expert(model.shared_experts, 0, h)))


def reached(model: PLE, x: torch.Tensor) -> dict[str, set[str]]:
    """For every trainable parameter, the tasks whose (random projection of the) output reaches it."""
    return tasks_reaching(model, x, NAMES)


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_own_parameters_are_exactly_those_only_the_task_reaches(name, params):
    """Every parameter a task lists as its own is reached by that task's loss alone, and every shared parameter by
    at least two tasks (so no task's own parameter hides among the shared ones)."""
    model = make(name, params)
    hits = reached(model, batch()[0][0].x)
    ids = {id(p): k for k, p in model.named_parameters()}
    shared = [ids[id(p)] for p in model.shared_parameters()]
    own = {n: [ids[id(p)] for p in model.task_parameters(n)] for n in NAMES}
    every = shared + [k for ks in own.values() for k in ks]
    assert sorted(every) == sorted(hits)  # a partition: each trainable parameter in exactly one set
    for n in NAMES:
        for k in own[n]:
            assert hits[k] == {n}, (k, hits[k])
    for k in shared:
        assert len(hits[k]) >= 2, (k, hits[k])


def test_in_ple_lower_task_experts_feed_every_task():
    """CGC: task a's experts are a's own. PLE: a's level-1 experts feed the shared gate, so every task's loss
    reaches them; a's gate at level N-1 feeds only a's level N."""
    cgc = make("cgc", {"expert_hidden": [4]})
    hits = reached(cgc, batch()[0][0].x)
    assert hits["task_experts.a.weights.0"] == {"a"}
    ple = make("ple", {"levels": 2, "expert_hidden": [4]})
    hits = reached(ple, batch()[0][0].x)
    assert hits["lower.0.experts.weights.0"] == set(NAMES) and hits["lower.0.gates.a.weight"] == {"a"}
    assert any(p is ple.lower[0].gates["a"].weight for p in ple.task_parameters("a"))
    ple3 = make("ple", {"levels": 3, "expert_hidden": [4]})
    hits = reached(ple3, batch()[0][0].x)
    assert hits["lower.0.gates.a.weight"] == set(NAMES) and hits["lower.1.gates.a.weight"] == {"a"}


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_representation_mode_is_exact(name, params):
    """outputs(features(x)) is the forward bit for bit, and a summing aggregator over the per-task feature
    gradients gives the summed loss's gradient."""
    model = make(name, params)
    src, rows = batch()
    assert_summing_aggregator_gives_summed_loss(model, src, rows, TASKS)


def test_built_from_yaml_and_bad_params_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [8]}\n  architecture: ple\n"
                   "  architecture_params: {levels: 3, shared_experts: 1, task_experts: 2, expert_hidden: [4]}\n")
    mc = load_config(cfg).model
    model = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    assert isinstance(model, PLE) and len(model.lower) == 2 and model.s == 1 and model.k == 2
    with pytest.raises(ConfigError, match=r"model\.architecture_params\.levels"):
        load_config(cfg, ["model.architecture_params.levels=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.architecture_params\.levels'"):
        build_model(TASKS, (6,), "mlp", {}, "cgc", {"levels": 2})
