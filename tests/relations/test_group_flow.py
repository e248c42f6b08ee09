"""`polytask group` as a library call: candidate networks with their own costs, and STG-MTL's two forms."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from polytask.config import Config
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError
from polytask.flows.group import group, network_job
from polytask.flows.runner import job_dir_of
from polytask.relations.workflow import NetworkSpec

SUITE = {"d": 8, "groups": [2], "unrelated": 1, "conflicting_pairs": 0, "noise": 0.3, "n_train": 96, "n_val": 64,
         "n_test": 64}


def cfg(tmp_path, name, **group):
    return Config.model_validate({
        "suite": {"name": "synthetic", "params": SUITE},
        "model": {"backbone_params": {"hidden": [16]}},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.01}},
        "baselines": {"cache": False},
        "relate": {"every": 2},
        "group": {"seeds": [0], "random_groupings": 0, **group},
        "output": {"dir": str(tmp_path), "name": name},
    })


def test_half_size_networks_are_trained_measured_and_chosen_within_a_real_budget(tmp_path):
    """Standley et al.'s setting through `polytask group`: pairwise (HOA) candidates at cost 1 plus one half-size
    single-task network per task at cost 0.5, budget 1.5; the half-size networks are trained with their own model
    and measured, and whatever is chosen stays within the budget and is trained as chosen."""
    c = cfg(tmp_path, "half", estimator="pairwise", budget=1.5,
            single_task_networks={"cost": 0.5, "model": {"backbone_params": {"hidden": [8]}}})
    run_dir, summary = group(c, reporter=Reporter(quiet=True))
    g = summary["grouping"]
    assert g["total_cost"] <= 1.5 and sum(g["costs"]) == g["total_cost"]
    assert g["meta"]["optimal"] and g["meta"]["costs"] == [0.5, 1.0]
    tasks = summary["tasks"]
    for t in tasks:  # each half-size network trained once, with half the width
        job, ncfg = network_job(NetworkSpec((t,), 0.5, "half-size", {"backbone_params": {"hidden": [8]}}), c, "net")
        weights = load_file(job_dir_of(run_dir, job) / "best.safetensors")
        assert ncfg.model.backbone_params == {"hidden": [8]}
        assert any(v.shape[0] == 8 for v in weights.values())
    chosen = summary["strategies"]["chosen"]
    assert chosen["groups"] == g["groups"] and chosen["costs"] == g["costs"] and chosen["labels"] == g["labels"]
    # 1.5 buys one full-size network and one half-size one: the planted pair together, the unrelated task alone
    assert g["groups"] == [["g0_t0", "g0_t1"], ["u0"]] and g["labels"] == ["", "half-size"]
    html = (run_dir / "report.html").read_text()
    assert "cost" in html and "Grouping (budget 1.5" in html


def test_listed_networks_are_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"group.networks.0.tasks: unknown task 'g0_t9'"):
        group(cfg(tmp_path, "bad1", networks=[{"tasks": ["g0_t9"], "cost": 0.5}]), reporter=Reporter(quiet=True))
    with pytest.raises(ConfigError, match="model overrides"):
        group(cfg(tmp_path, "bad2", networks=[{"tasks": ["u0"], "cost": 0.5, "model": {"backbone": 3}}]),
              reporter=Reporter(quiet=True))


def test_stg_soft_form_trains_membership_weighted_models_and_serves_their_ensemble(tmp_path):
    c = cfg(tmp_path, "stg", estimator="datamap", budget=2)
    assert c.group.stg_form == "soft"  # the paper's form is the default
    run_dir, summary = group(c, reporter=Reporter(quiet=True))
    st = summary["strategies"]["chosen"]
    u = np.array(st["membership"])
    tasks = summary["tasks"]
    assert st["form"] == "stg-soft" and st["models"] == 2 and u.shape == (len(tasks), 2)
    np.testing.assert_allclose(u.sum(1), 1.0)
    assert all(grp == tasks for grp in st["groups"])  # every model trains every task
    for cl in range(2):  # ... with its loss weights the memberships of its cluster
        result = json.loads((job_dir_of(run_dir, _job(tasks, cl)) / "result.json").read_text())
        assert result["method"] == "static"
    # the served prediction is the membership-weighted mixture of the two models' probabilities / values
    from polytask.models import build_model
    from polytask.relations.stg import MembershipEnsemble
    from polytask.tasks import build_suite

    suite = build_suite("synthetic", SUITE, 0)
    models = []
    for cl in range(2):
        m = build_model(list(suite.tasks), suite.input_shape, "mlp", {"hidden": [16]}, "hard", {})
        m.load_state_dict(load_file(job_dir_of(run_dir, _job(tasks, cl)) / "best.safetensors"))
        models.append(m.eval())
    ens = MembershipEnsemble(models, u, list(suite.tasks)).eval()
    x = suite.splits["val"][0].x[:5]
    with torch.no_grad():
        out, parts = ens(x, tasks), [m(x, tasks) for m in models]
    for i, t in enumerate(suite.tasks):
        if t.kind == "classification":
            want = torch.log(sum(u[i, k] * parts[k][t.name].softmax(-1) for k in range(2)))
        else:
            want = sum(u[i, k] * parts[k][t.name] for k in range(2))
        torch.testing.assert_close(out[t.name], want.to(out[t.name].dtype))
    _, hard = group(cfg(tmp_path, "stg-hard", estimator="datamap", budget=2, stg_form="hard"),
                    reporter=Reporter(quiet=True))
    assert "form" not in hard["strategies"]["chosen"] and hard["stg_form"] == "hard"
    assert sorted(t for grp in hard["strategies"]["chosen"]["groups"] for t in grp) == sorted(tasks)


def _job(tasks, cluster):
    from polytask.config import MethodConfig
    from polytask.flows.jobs import Job

    return Job(f"s0/stg-soft/cluster-{cluster}", tuple(tasks), MethodConfig(name="static"), "joint")


def test_choose_groups_values_a_listed_network_by_the_flows_measure_and_trains_nothing_itself(tmp_path):
    """The grouping solver is pure: a listed network without losses under the pairwise estimator is valued by the
    ``measure`` the group flow passes (training it); without one it is a ConfigError naming the network."""
    from types import SimpleNamespace

    from polytask.relations import AffinityMatrix
    from polytask.relations.workflow import choose_groups

    names = ["a", "b", "c"]
    pair = {"a+b": {"a": 0.9, "b": 0.9}, "a+c": {"a": 0.9, "c": 0.9}, "b+c": {"b": 0.9, "c": 0.9}}
    aff = AffinityMatrix(np.zeros((3, 3)), names, "pairwise",
                         meta={"single_loss": dict.fromkeys(names, 1.0), "pair_loss": pair})
    config = Config.model_validate({"group": {"budget": 1, "estimator": "pairwise",
                                              "networks": [{"tasks": names, "cost": 1, "label": "wide"}]}})
    suite = SimpleNamespace(task_names=names)
    with pytest.raises(ConfigError, match=r"group.networks.0"):
        choose_groups(config, aff, tmp_path, suite)
    asked = []

    def measure(net: NetworkSpec) -> dict[str, float]:
        asked.append(net.label)
        return dict.fromkeys(net.tasks, 0.1)

    chosen = choose_groups(config, aff, tmp_path, suite, measure)
    assert asked == ["wide"] and list(tmp_path.iterdir()) == []
    assert chosen.groups == [names] and chosen.labels == ["wide"]
