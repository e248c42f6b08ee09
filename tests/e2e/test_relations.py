"""`polytask relate` and `polytask group` end to end, in real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from polytask.relations.affinity import AffinityMatrix

CLI = [sys.executable, "-m", "polytask.cli"]
EXAMPLE = Path(__file__).parents[2] / "examples" / "synthetic_groups.yaml"


def polytask(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def test_relate_writes_every_estimator_with_cost(tmp_path):
    cfg = {
        "suite": {"name": "synthetic", "params": {"d": 8, "groups": [2], "unrelated": 1, "conflicting_pairs": 0,
                                                  "n_train": 200, "n_val": 100, "n_test": 100}},
        "model": {"backbone_params": {"hidden": [16]}},
        "train": {"epochs": 2, "batch_size": 50},
        "relate": {"estimators": ["lookahead", "grad_cosine", "datamap", "pairwise"], "every": 2},
        "output": {"dir": str(tmp_path), "name": "rel"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = polytask("relate", str(tmp_path / "c.yaml"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "rel"
    for est in ("lookahead", "grad_cosine", "datamap", "pairwise"):
        aff = AffinityMatrix.load(run / f"affinity_{est}.json")
        assert aff.tasks == ["g0_t0", "g0_t1", "u0"] and aff.matrix.shape == (3, 3)
        assert "<svg" in (run / f"affinity_{est}.svg").read_text()
        assert f"{est} affinity" in r.stdout
    assert AffinityMatrix.load(run / "affinity_lookahead.json").cost["probe_calls"] == 4 * 2 // 2
    # each estimator carries its own cost: its own work plus the shared gradients it read, not all probes' sum
    cost = {est: AffinityMatrix.load(run / f"affinity_{est}.json").cost for est in ("lookahead", "grad_cosine",
                                                                                   "datamap")}
    for c in cost.values():
        assert c["probe_time_s"] == c["own_time_s"] + c["gradient_time_s"] == c["wall_time_s"]
    assert cost["datamap"]["gradient_time_s"] == 0.0 and cost["lookahead"]["gradient_time_s"] > 0.0
    assert cost["lookahead"]["gradient_time_s"] == cost["grad_cosine"]["gradient_time_s"]  # one shared pass
    assert AffinityMatrix.load(run / "affinity_pairwise.json").cost["training_runs"] == 3 + 3
    html = (run / "report.html").read_text()
    assert "Task relations" in html and "Spearman" in html


def test_group_recovers_planted_groups_and_beats_alternatives(tmp_path):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["relate"]["estimators"] = ["lookahead"]
    cfg["group"] |= {"seeds": [0], "random_groupings": 1}
    cfg["output"] = {"dir": str(tmp_path), "name": "grp"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = polytask("group", str(tmp_path / "c.yaml"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "grp" / "groups.json").read_text())
    chosen = [set(g) for g in summary["grouping"]["groups"]]
    planted = [set(g) for g in summary["planted_groups"] if len(g) > 1]
    assert len(chosen) == 3
    for p in planted:  # each planted group is served whole by one chosen group, never mixed with another
        assert sum(p <= c for c in chosen) == 1, (p, chosen)
        assert all(not (c & p) or p <= c for c in chosen)
    assert all(sum(bool(c & p) for p in planted) == 1 for c in chosen)
    loss = {k: v["total_val_loss_mean"] for k, v in summary["strategies"].items()}
    assert loss["chosen"] < loss["all-in-one"] and loss["chosen"] < loss["random-0"], loss
    assert "chosen groups (lookahead, budget 3)" in r.stdout


def test_transferability_from_frozen_single_task_models(tmp_path):
    cfg = {"suite": {"name": "digit-attributes"}, "train": {"epochs": 8, "optimizer": {"lr": 0.003}},
           "model": {"backbone_params": {"hidden": [64]}},
           "relate": {"estimators": ["logme", "leep", "hscore", "nce"]},
           "output": {"dir": str(tmp_path), "name": "tr"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = polytask("relate", str(tmp_path / "c.yaml"))
    assert r.returncode == 0, r.stderr
    leep = AffinityMatrix.load(tmp_path / "tr" / "affinity_leep.json")
    d = leep.index("digit")
    # the digit class determines every other attribute: its model is the best other source for each of them
    for j, target in enumerate(leep.tasks):
        if target != "digit":
            others = [i for i in range(leep.k) if i != j]
            assert max(others, key=lambda i: leep.matrix[i, j]) == d, (target, leep.matrix[:, j])
    for est in ("logme", "hscore", "nce"):
        aff = AffinityMatrix.load(tmp_path / "tr" / f"affinity_{est}.json")
        assert aff.cost["training_runs"] == 6 and aff.tasks == leep.tasks
