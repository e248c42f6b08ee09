"""AdaTT (Li et al. 2023, KDD) against its fusion equations recomputed by hand the way the authors' code computes
them (the native weights added to the gate weights, then one weighted sum over all experts), its special cases,
and the shared/per-task partition: every expert feeds every task's gate, so only the last level's gates, native
weights and the towers are per task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_summing_aggregator_gives_summed_loss, expert_by_hand, tasks_reaching, three_task_batch
from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.models.adatt import AdaTT
from polytask.tasks import Task

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]
NAMES = [t.name for t in TASKS]


batch = three_task_batch
expert = expert_by_hand


def by_hand(model: AdaTT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Level by level, unit by unit, expert by expert: unit u's weights over all experts are softmax(W_u x_u) with
    its native weights v_u (1 for a unit with one expert) added on its own experts; its output is the weighted sum
    of every expert; task experts read their task's input, shared experts the shared unit's."""
    h = model.encoder(x)
    t, k, s = len(NAMES), model.k, model.s
    inputs = [h] * (t + (s > 0))
    for j, level in enumerate(model.levels):
        experts = [expert(level.experts, i * k + q, inputs[i]) for i in range(t) for q in range(k)]
        experts += [expert(level.experts, t * k + q, inputs[t]) for q in range(s)]
        units = t if j == len(model.levels) - 1 or s == 0 else t + 1
        new = []
        for u in range(units):
            lin = level.gates[NAMES[u]] if u < t else level.shared_gate
            w = torch.softmax(inputs[u] @ lin.weight.T + lin.bias, dim=-1).clone()
            if model.residual:
                own = range(u * k, (u + 1) * k) if u < t else range(t * k, t * k + s)
                v = (level.native[NAMES[u]] if u < t else level.shared_native) if len(own) > 1 else torch.ones(1)
                w[:, own.start:own.stop] += v
            new.append(sum(w[:, e:e + 1] * f for e, f in enumerate(experts)))
        inputs = new
    return {n: model.heads[n](inputs[i]) for i, n in enumerate(NAMES)}


VARIANTS = [
    {"levels": 1, "task_experts": 1, "expert_hidden": [4]},
    {"levels": 1, "task_experts": 2, "shared_experts": 1, "expert_hidden": [6, 4]},
    {"levels": 2, "task_experts": 2, "expert_hidden": [5]},
    {"levels": 2, "task_experts": 1, "shared_experts": 2, "expert_hidden": [5]},
    {"levels": 3, "task_experts": 3, "shared_experts": 1, "expert_hidden": [6, 4]},
    {"levels": 3, "task_experts": 2, "shared_experts": 2, "expert_hidden": [4], "residual": False},
]


def make(params: dict, seed: int = 0) -> AdaTT:
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [8, 5]}, "adatt", params)
    assert isinstance(model, AdaTT)
    return model


@pytest.mark.parametrize("params", VARIANTS)
def test_the_forward_is_the_fusion_equations(params):
    model = make(params)
    x = batch()[0][0].x
    want, got = by_hand(model, x), model(x)
    for n in NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_one_expert_per_task_has_the_identity_residual():
    """With one expert per task the native combination is that expert itself (no learnt v): on any encoder, from
    Python, tower_t(softmax(W_t h) E(h) + E_t(h))."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 7), nn.Tanh())
    model = AdaTT(encoder, 7, TASKS, levels=1, task_experts=1, expert_hidden=[5])
    assert len(model.levels[0].native) == 0
    x = batch()[0][0].x
    h = encoder(x)
    experts = torch.stack([expert(model.levels[0].experts, e, h) for e in range(3)], 1)
    for i, n in enumerate(NAMES):
        w = torch.softmax(model.levels[0].gates[n](h), -1)
        want = model.heads[n]((w.unsqueeze(-1) * experts).sum(1) + experts[:, i])
        torch.testing.assert_close(model(x, [n])[n], want)


def test_without_the_residual_one_level_is_a_gated_mixture_of_all_experts():
    """residual: false ablates NativeExpLF: one level is then MMoE over every task's experts (no native weights)."""
    model = make({"levels": 1, "task_experts": 2, "residual": False, "expert_hidden": [4]})
    assert len(model.levels[0].native) == 0
    x = batch()[0][0].x
    h = model.encoder(x)
    experts = torch.stack([expert(model.levels[0].experts, e, h) for e in range(6)], 1)
    for n in NAMES:
        w = torch.softmax(model.levels[0].gates[n](h), -1)
        torch.testing.assert_close(model(x, [n])[n], model.heads[n]((w.unsqueeze(-1) * experts).sum(1)))


def reached(model: AdaTT, x: torch.Tensor) -> dict[str, set[str]]:
    """For every trainable parameter, the tasks whose (random projection of the) output reaches it."""
    return tasks_reaching(model, x, NAMES)


@pytest.mark.parametrize("params", VARIANTS)
def test_own_parameters_are_exactly_those_only_the_task_reaches(params):
    """A task's own parameters are reached by its loss alone and every shared one by every task: all experts,
    including the last level's task experts, feed every task's gate."""
    model = make(params)
    hits = reached(model, batch()[0][0].x)
    ids = {id(p): k for k, p in model.named_parameters()}
    shared = [ids[id(p)] for p in model.shared_parameters()]
    own = {n: [ids[id(p)] for p in model.task_parameters(n)] for n in NAMES}
    assert sorted(shared + [k for ks in own.values() for k in ks]) == sorted(hits)  # each in exactly one set
    for n in NAMES:
        assert own[n] and all(hits[k] == {n} for k in own[n]), {k: hits[k] for k in own[n]}
    assert all(hits[k] == set(NAMES) for k in shared), {k: hits[k] for k in shared if hits[k] != set(NAMES)}
    last = f"levels.{len(model.levels) - 1}"
    assert f"{last}.experts.weights.0" in shared and f"{last}.gates.a.weight" in own["a"]


@pytest.mark.parametrize("params", VARIANTS)
def test_representation_mode_is_exact(params):
    """outputs(features(x)) is the forward bit for bit, and a summing aggregator over the per-task feature
    gradients gives the summed loss's gradient."""
    model = make(params)
    src, rows = batch()
    assert_summing_aggregator_gives_summed_loss(model, src, rows, TASKS)


def test_built_from_yaml_and_bad_params_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backbone: mlp\n  backbone_params: {hidden: [8]}\n  architecture: adatt\n"
                   "  architecture_params: {levels: 3, shared_experts: 1, task_experts: 2, expert_hidden: [4]}\n")
    mc = load_config(cfg).model
    model = build_model(TASKS, (6,), mc.backbone, mc.backbone_params, mc.architecture, mc.architecture_params)
    assert isinstance(model, AdaTT) and len(model.levels) == 3 and model.s == 1 and model.k == 2
    with pytest.raises(ConfigError, match=r"model\.architecture_params\.task_experts"):
        load_config(cfg, ["model.architecture_params.task_experts=0"])
