"""PaMaL (Dimitriadis, Frossard & Fleuret 2023): the weight ensemble, its multi-forward loss, and a run through the
CLI that writes a front, resumes exactly after SIGKILL, and draws the front in the report."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from polytask.config import MethodConfig
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method
from polytask.errors import ConfigError
from polytask.methods import load_all
from polytask.models import MultiTaskModel, build_model
from polytask.models.pareto import (
    ParetoEnsemble,
    front_grid,
    interpolate,
    multi_forward_penalty,
    pamal_losses,
    pamal_objective,
    sample_alphas,
)
from polytask.models.user import UserModel
from polytask.tasks import Task, TaskData

TASKS = [Task("a", "regression", 1), Task("b", "classification", 3)]
CLI = [sys.executable, "-m", "polytask.cli"]


def models(k: int = 2, seed: int = 0) -> list[MultiTaskModel]:
    torch.manual_seed(seed)
    return [build_model(TASKS, (5,), "mlp", {"hidden": [16]}) for _ in range(k)]


def from_models(ms: list[MultiTaskModel]) -> ParetoEnsemble:
    """An ensemble whose anchors are exactly ``ms`` (the factory hands out copies of them in order)."""
    it = iter(copy.deepcopy(ms))
    return ParetoEnsemble(lambda: next(it), len(ms))


def data(n: int = 12) -> tuple[list[TaskData], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    y = {"a": torch.randn(n, generator=g), "b": torch.randint(0, 3, (n,), generator=g).float()}
    y["a"][:2] = float("nan")  # a missing label is masked as in task_losses
    return [TaskData(torch.randn(n, 5, generator=g), y)], [torch.arange(n)]


# ---------------------------------------------------------------- the ensemble


def test_a_vertex_is_exactly_its_anchor_network_and_the_default_is_the_centre():
    ms = models(3)
    ens = from_models(ms)
    x = torch.randn(7, 5)
    assert torch.equal(ens.alpha, torch.full((3,), 1 / 3))
    for k, m in enumerate(ms):
        with ens.at([float(i == k) for i in range(3)]):
            got = ens(x)
        want = m(x)
        assert all(torch.equal(got[t], want[t]) for t in ("a", "b")), k
        net = ens.network([float(i == k) for i in range(3)])  # a standalone copy at that alpha
        assert all(torch.equal(net(x)[t], want[t]) for t in ("a", "b"))
    assert torch.equal(ens.alpha, torch.full((3,), 1 / 3))  # at() gives the weighting back


def test_theta_is_linear_in_alpha():
    ens = from_models(models(3))
    a, b, lam = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.1, 0.3]), 0.35
    wa, wb, wm = ens.weights(a), ens.weights(b), ens.weights(lam * a + (1 - lam) * b)
    for name in wm:
        torch.testing.assert_close(wm[name], lam * wa[name] + (1 - lam) * wb[name], rtol=1e-6, atol=1e-6)
    stacked = torch.randn(3, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(interpolate(a.double(), stacked), sum(a[m].item() * stacked[m] for m in range(3)))


def test_the_partition_maps_the_inner_model_onto_the_anchors():
    ms = models(2)
    ens = from_models(ms)
    shared, own = list(ens.shared_parameters()), {t: list(ens.task_parameters(t)) for t in ("a", "b")}
    every = [id(p) for p in shared] + [id(p) for ps in own.values() for p in ps]
    assert sorted(every) == sorted(id(p) for p in ens.parameters()) and len(set(every)) == len(every)
    assert [tuple(p.shape) for p in shared] == [(2, *p.shape) for p in ms[0].shared_parameters()]
    assert [tuple(p.shape) for p in own["b"]] == [(2, *p.shape) for p in ms[0].task_parameters("b")]
    assert ens.features(torch.randn(2, 5)) is None  # methods differentiate the loss function's losses
    # a gradient of task a's loss reaches the shared anchors and a's head, never b's head
    ens(torch.randn(4, 5), ["a"])["a"].sum().backward()
    assert all(p.grad is not None for p in shared + own["a"]) and all(p.grad is None for p in own["b"])


def test_independent_anchors_differ_same_anchors_agree_and_a_bad_alpha_is_named():
    torch.manual_seed(0)
    ind = ParetoEnsemble(lambda: build_model(TASKS, (5,), "mlp", {"hidden": [16]}), 2)
    same = ParetoEnsemble(build_model(TASKS, (5,), "mlp", {"hidden": [16]}), 2, "same")
    reset = ParetoEnsemble(build_model(TASKS, (5,), "mlp", {"hidden": [16]}), 2)  # a module: reset_parameters
    for p in ind.anchors.values():
        assert not torch.equal(p[0], p[1])
    for p in same.anchors.values():
        assert torch.equal(p[0], p[1])
    assert all(not torch.equal(p[0], p[1]) for p in reset.anchors.values())
    with pytest.raises(ConfigError, match=r"alpha \[0.5, 0.6\]: need 2 non-negative weights summing to 1"), \
            ind.at([0.5, 0.6]):
        pass


class Normed(nn.Module):
    """A user's module with BatchNorm (running statistics) and a tied weight."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.a, self.b = nn.Linear(6, 1), nn.Linear(6, 3)
        self.tied = nn.Linear(6, 3)
        self.tied.weight = self.b.weight  # one parameter in two modules
        self.alias = self.a  # one module under two names

    def forward(self, x):
        z = self.bn(torch.relu(self.lin(x)))
        return {"a": self.alias(z), "b": self.b(z) + self.tied(z)}


def test_batchnorm_statistics_are_one_shared_copy_and_tied_weights_stay_tied():
    torch.manual_seed(0)
    net = Normed()
    ens = ParetoEnsemble(UserModel(net, TASKS, heads={"a": net.a}), 2)
    stats = [k for k in ens.state_dict() if "running_mean" in k]
    assert stats == ["inner.model.bn.running_mean"]  # one set of running statistics, as the official code
    assert "anchors.model/b/weight" in ens.state_dict() and "anchors.model/tied/weight" not in ens.state_dict()
    assert "anchors.model/tied/bias" in ens.state_dict() and "anchors.model/alias/weight" not in ens.state_dict()
    net = ens.network([0.0, 1.0]).eval()  # a standalone copy keeps the tie
    assert net.model.b.weight is net.model.tied.weight and net.model.alias is net.model.a
    with ens.at([0.0, 1.0]):
        torch.testing.assert_close(ens.eval()(torch.ones(2, 5))["b"], net(torch.ones(2, 5))["b"], rtol=0, atol=0)
    ens.train()
    before = ens.inner.model.bn.running_mean.clone()
    with ens.at([1.0, 0.0]):
        ens(torch.randn(8, 5))
    assert not torch.equal(before, ens.inner.model.bn.running_mean)  # updated by the forward at any alpha
    ens.eval()
    out = ens(torch.randn(3, 5))
    assert out["b"].shape == (3, 3)


class WithAux(MultiTaskModel):
    """A model with an auxiliary loss computed from its parameters (as a mixture-of-experts' load balancing)."""

    def __init__(self):
        super().__init__()
        self.task_names = ["a", "b"]
        self.enc, self.heads = nn.Linear(5, 4), nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 3)})

    def forward(self, x, tasks=None):
        return {t: self.heads[t](self.enc(x)) for t in tasks or self.task_names}

    def shared_parameters(self):
        return self.enc.parameters()

    def task_parameters(self, task):
        return self.heads[task].parameters()

    def aux_loss(self):
        return self.enc.weight.pow(2).sum()


def test_the_auxiliary_loss_is_the_inner_models_at_the_current_alpha():
    torch.manual_seed(0)
    ms = [WithAux(), WithAux()]
    ens = from_models(ms)
    with ens.at([0.0, 1.0]):
        assert torch.equal(ens.aux_loss(), ms[1].aux_loss())
    mid = 0.5 * (ms[0].enc.weight + ms[1].enc.weight)
    torch.testing.assert_close(ens.aux_loss(), mid.pow(2).sum())
    assert from_models(models(2)).aux_loss() is None


# ---------------------------------------------------------------- the loss


def test_multi_forward_penalty_by_hand():
    alphas = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    losses = torch.tensor([[1.0, 2.0], [3.0, 0.5], [1.5, 1.0]])
    # task 0, alpha decreasing: rows 0 (0.7), 2 (0.5), 1 (0.2): losses 1.0, 1.5, 3.0: the loss falls as the
    # weight grows, no wrong ordering. Task 1: rows 1 (0.8), 2 (0.5), 0 (0.3): losses 0.5, 1.0, 2.0: none either.
    assert torch.equal(multi_forward_penalty(alphas, losses, 1.0, "paper"), torch.zeros(2))
    # the official sign penalises these (expected) orderings: task 0 pairs 0.5, 1.5; task 1 pairs 0.5, 1.0
    want = torch.tensor([math.log((math.exp(0.5) + math.exp(1.5)) / 2), math.log((math.exp(0.5) + math.exp(1.0)) / 2)])
    torch.testing.assert_close(multi_forward_penalty(alphas, losses, 1.0, "official"), want)
    # a wrong ordering for task 0 (its loss rises with its weight), at temperature 2
    bad = torch.tensor([[3.0, 2.0], [1.0, 0.5], [1.5, 1.0]])
    want0 = math.log((math.exp(2 * 1.5) + math.exp(2 * 0.5)) / 2)  # pairs 3.0 - 1.5 and 1.5 - 1.0
    torch.testing.assert_close(multi_forward_penalty(alphas, bad, 2.0, "paper"), torch.tensor([want0, 0.0]))
    assert torch.equal(multi_forward_penalty(alphas[:1], losses[:1]), torch.zeros(2))  # one draw: no pairs


def test_objective_by_hand_and_the_official_gate():
    alphas = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    bad = torch.tensor([[3.0, 2.0], [1.0, 0.5]])  # task 0 worse at its larger weight
    scal = torch.tensor([0.7 * 3.0 + 0.2 * 1.0, 0.3 * 2.0 + 0.8 * 0.5])
    torch.testing.assert_close(pamal_objective(alphas, bad), scal)
    reg = torch.tensor([2.0, 0.0])  # log(exp(T * relu(3 - 1)) / 1), T = 1
    torch.testing.assert_close(pamal_objective(alphas, bad, 0.5, 1.0, "paper"), scal + 0.5 * reg)
    # official: the code's sign (task 1 is penalised: 2.0 - 0.5 for decreasing alpha_1), added only below the loss
    off = torch.tensor([0.0, 1.5])
    torch.testing.assert_close(pamal_objective(alphas, bad, 0.5, 1.0, "official"), scal + 0.5 * off)
    torch.testing.assert_close(pamal_objective(alphas, bad, 100.0, 1.0, "official"), scal)


def test_pamal_losses_equal_a_hand_computation_for_the_drawn_alphas():
    ens = from_models(models(2))
    sources, rows = data()
    torch.manual_seed(11)
    alphas = sample_alphas(3, 2, 0.7)
    torch.manual_seed(11)
    got = pamal_losses(task_losses, samples=3, concentration=0.7, coefficient=0.3, temperature=2.0)(
        ens, sources, rows, TASKS)
    assert torch.equal(ens.alpha, torch.full((2,), 0.5))
    per = []
    for a in alphas:
        with ens.at(a):
            out = ens(sources[0].x)
        la = ((out["a"].squeeze(-1) - sources[0].y["a"]) ** 2)[2:].mean()
        lb = nn.functional.cross_entropy(out["b"], sources[0].y["b"].long())
        per.append((la, lb))
    want = []
    for k in range(2):
        scal = sum(alphas[j, k] * per[j][k] for j in range(3))
        order = sorted(range(3), key=lambda j: -alphas[j, k].item())
        pen = [torch.relu(per[order[i]][k] - per[order[i + 1]][k]) for i in range(2)]
        want.append(scal + 0.3 * torch.log(sum(torch.exp(2.0 * p) for p in pen) / 2))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    got.sum().backward()  # the graph reaches every anchor
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.parameters())


def test_the_front_grid():
    two, three = front_grid(2), front_grid(3)
    assert len(two) == 11 and two[0] == (1.0, 0.0) and two[-1] == (0.0, 1.0) and (0.5, 0.5) in two
    assert len(three) == 66 and len(set(three)) == 66 and all(abs(sum(a) - 1) < 1e-9 for a in three)
    five = front_grid(5, seed=4)
    assert len(five) == 5 + 1 + 10 and five == front_grid(5, seed=4) and five[5] == (0.2,) * 5


def test_the_method_entry():
    entry = load_all().get("pamal")
    assert entry.extra == {"kind": "weighting", "pareto": True} and "Dimitriadis" in entry.paper
    with pytest.raises(ConfigError, match="pamal trains a weight ensemble"):  # outside a run: refused
        build_method(MethodConfig(name="pamal"), ["a", "b"])

    def inner(params):  # what a run's job builds: the entry's inner method
        return load_all().build("pamal", params, ["a", "b"])

    w, _ = inner({}).update(inner({}).init(), torch.tensor([1.0, 2.0]), None)
    assert torch.equal(w, torch.ones(2))
    with pytest.raises(ConfigError, match="pcgard"):
        inner({"inner": "pcgard"})
    with pytest.raises(ConfigError, match=r"inner.*trains a weight ensemble itself"):
        inner({"inner": "pamal"})
    with pytest.raises(ConfigError, match="tempreature"):
        inner({"inner": "dwa", "inner_params": {"tempreature": 2}})
    with pytest.raises(ConfigError, match="JointStep"):
        inner({"inner": "upgrad"})


# ---------------------------------------------------------------- a run through the CLI


def write_config(root: Path) -> Path:
    """Two conflicting tasks (``synthetic``: y_b = -f(x) + noise), an MLP [16], 3 epochs of 8 steps; PaMaL first,
    then equal (a point beside the front); checkpoints every 5 steps."""
    cfg = root / "pamal.yaml"
    cfg.write_text(f"""
seed: 0
suite: {{name: synthetic, params: {{d: 8, groups: [], unrelated: 0, conflicting_pairs: 1, n_train: 256, n_val: 128,
                                    n_test: 128}}}}
model: {{backbone: mlp, backbone_params: {{hidden: [16]}}}}
train: {{epochs: 3, batch_size: 32, checkpoint_every: 5, checkpoint_interval_s: 0, optimizer: {{name: adam, lr: 0.01}}}}
methods: [{{name: pamal, params: {{samples: 2, reg_coefficient: 1.0}}}}, equal]
baselines: {{single_task: false}}
output: {{dir: {root}, name: run}}
""")
    return cfg


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run, uninterrupted (``polytask run``)."""
    root = tmp_path_factory.mktemp("straight")
    r = cli("run", str(write_config(root)), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def test_a_run_writes_a_front_whose_ends_trade_the_tasks_off(straight: Path):
    result = json.loads((straight / "jobs" / "pamal" / "result.json").read_text())
    front = result["front"]
    assert [p["alpha"] for p in front] == [list(a) for a in front_grid(2)]
    first, last = front[0]["test"], front[-1]["test"]  # alpha = (1, 0): task c0_a's anchor; (0, 1): c0_b's
    assert first["c0_a"]["mse"] < last["c0_a"]["mse"] and last["c0_b"]["mse"] < first["c0_b"]["mse"]
    assert result["alpha"] == [0.5, 0.5] and front[5]["test"] == result["test"]  # the reported row is the centre
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["results"]["pamal"]["method"] == "pamal" and set(summary["results"]) == {"pamal", "equal"}
    page = (straight / "report.html").read_text()
    assert "Front of pamal" in page and page.count("data-front=\"point\"") == 11
    assert "pamal front (11 weightings)" in page and "data-label=\"equal\"" in page


def test_load_gives_the_ensemble_at_the_reported_centre(straight: Path):
    """``polytask.load`` rebuilds a PaMaL job as its ensemble at the simplex centre: its test MSE is the row the run
    reports."""
    from polytask import load
    from polytask.engine.loop import evaluate
    from polytask.models.pareto import ParetoEnsemble

    predictor = load(straight, "pamal")
    assert isinstance(predictor.model, ParetoEnsemble)
    result = json.loads((straight / "jobs" / "pamal" / "result.json").read_text())
    from polytask.config import load_config
    from polytask.flows.runner import run_suite

    suite = run_suite(load_config(straight / "config.yaml"), straight)
    got = evaluate(predictor.model, suite.splits["test"], list(suite.tasks))
    for task, scores in result["test"].items():
        assert got[task]["mse"] == pytest.approx(scores["mse"], rel=1e-6), task


def test_sigkill_mid_run_resumes_to_identical_weights_and_front(straight: Path, tmp_path: Path):
    cfg = write_config(tmp_path)
    killed = cli("run", str(cfg), "--quiet", env={"POLYTASK_KILL_AT": "step:13"})  # epoch 2, after step 10's save
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "run" / "jobs" / "pamal" / "last.safetensors").is_file()
    assert not (tmp_path / "run" / "jobs" / "pamal" / "result.json").exists()
    again = cli("run", "--resume", str(tmp_path / "run"), "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("last.safetensors", "best.safetensors"):
        assert (tmp_path / "run" / "jobs" / "pamal" / name).read_bytes() == \
            (straight / "jobs" / "pamal" / name).read_bytes(), name
    got, want = ((d / "jobs" / "pamal" / "result.json") for d in (tmp_path / "run", straight))
    got, want = json.loads(got.read_text()), json.loads(want.read_text())
    assert got["front"] == want["front"] and got["test"] == want["test"] and got["history"] == want["history"]


def fake_run(root: Path, k: int) -> tuple[Path, dict]:
    """A run directory with a PaMaL job whose test mse on task t at weighting alpha is 1 - alpha_t, and an
    ``equal`` row at 0.6 on every task."""
    names = [f"t{i}" for i in range(k)]
    summary = {"suite": {"tasks": [{"name": t, "metrics": [{"name": "mse", "higher_is_better": False}]}
                                   for t in names]},
               "results": {"pamal": {"tasks": {t: {"mse": 1 - 1 / k} for t in names}},
                           "equal": {"tasks": {t: {"mse": 0.6} for t in names}}}}
    front = [{"alpha": list(a), "test": {t: {"mse": 1 - a[i]} for i, t in enumerate(names)}} for a in front_grid(k)]
    (root / "jobs" / "pamal").mkdir(parents=True)
    centre = {t: {"mse": 1 - 1 / k} for t in names}  # what the run reports (the 3-task grid lacks the centre)
    (root / "jobs" / "pamal" / "result.json").write_text(json.dumps({"job": "pamal", "front": front, "test": centre}))
    return root, summary


def test_the_report_draws_the_front_for_two_and_three_tasks_with_hypervolume(tmp_path: Path):
    from polytask.report.front import front_data, front_section

    run, summary = fake_run(tmp_path / "two", 2)
    data = front_data(json.loads((run / "jobs" / "pamal" / "result.json").read_text()), summary)
    # points (x, 1 - x), x = 0, 0.1, ..., 1; reference point (1.1, 1.1): the staircase's area is 0.1 * 0.1 * 66
    assert data["reference_point"] == pytest.approx([1.1, 1.1])
    assert data["hypervolume"]["pamal front (11 weightings)"] == pytest.approx(0.66)
    assert data["hypervolume"]["equal"] == pytest.approx(0.5 * 0.5)
    assert data["hypervolume"]["pamal at the centre (reported)"] == pytest.approx(0.6 * 0.6)
    html = front_section(run, summary)
    assert html.count("<svg") == 1 and html.count('data-front="point"') == 11 and "anchor t0" in html
    run, summary = fake_run(tmp_path / "three", 3)
    html = front_section(run, summary)
    assert html.count("<svg") == 3 and html.count('data-front="point"') == 3 * 66  # pairwise projections
    assert "pamal front (66 weightings)" in html and "anchor t2" in html and "(projection)" in html
    assert html.count('data-label="pamal (centre)"') == 3 and "pamal at the centre (reported)" in html
    assert front_section(tmp_path / "empty", summary) == ""


def test_config_refuses_representation_mode_and_fmtl_up_front():
    from polytask.config import load_config

    for override in ("grad_mode: representation", "sam_rho: 0.05"):
        with pytest.raises(ConfigError, match=r"methods\.0: pamal differentiates its multi-forward losses"):
            load_config(None, ["flow=compare", f"methods=[{{name: pamal, {override}}}]"])


def test_an_aggregator_or_a_stateful_weighting_applies_on_top(tmp_path: Path):
    from polytask.config import load_config
    from polytask.engine.progress import Reporter
    from polytask.flows.run import run

    cfg = load_config(None, [
        "flow=compare", "suite.name=synthetic", "model.backbone_params={hidden: [16]}",
        "suite.params={d: 8, groups: [], unrelated: 0, conflicting_pairs: 1, n_train: 64, n_val: 32, n_test: 32}",
        "train={epochs: 1, batch_size: 32, accumulate: 2}", "baselines.single_task=false",
        "methods=[{name: pamal, label: up, params: {inner: upgrad}}, "
        "{name: pamal, label: fa, params: {inner: famo, regulariser: official, samples: 3}}]",
        f"output.dir={tmp_path}", "output.name=r"])
    _, summary = run(cfg, reporter=Reporter(quiet=True), report=False)
    for label in ("up", "fa"):
        assert summary["results"][label]["method"] == "pamal"
        front = json.loads((tmp_path / "r" / "jobs" / label / "result.json").read_text())["front"]
        assert len(front) == 11 and all(math.isfinite(p["test"]["c0_a"]["mse"]) for p in front)
