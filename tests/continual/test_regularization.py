"""Regularisation strategies (EWC separate and online, SI, MAS, LwF): their math against hand computations, the
identities with naive at zero strength, and less forgetting than naive on split-digits."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polytask.continual import build_strategy, build_stream
from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.ewc import EWC, EWCParams, fisher_diagonal
from polytask.continual.strategies.lwf import distillation, old_outputs
from polytask.continual.strategies.mas import MAS, MASParams, output_sensitivity
from polytask.continual.strategies.regularization import trainable
from polytask.continual.strategies.si import SI, SIParams
from polytask.engine import checkpoint
from polytask.errors import ConfigError
from polytask.flows.continual import continual
from polytask.models import build_model
from polytask.tasks import Task, TaskData

CPU = torch.device("cpu")


def _linear(tasks, d=3, seed=0):
    """A model with no hidden layer: each head is one Linear on the raw input (gradients by hand are easy)."""
    torch.manual_seed(seed)
    return build_model(tasks, (d,), "mlp", {"hidden": []})


def _data(n=7, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, {"c": torch.randint(0, 3, (n,), generator=g).float(), "r": torch.randn(n, 2, generator=g)}


def _run(model):
    return SimpleNamespace(model=model, device=CPU)


# ---------------------------------------------------------------- EWC


def test_fisher_equals_a_hand_computation_on_a_linear_model():
    """Per-example gradients of a linear softmax head are (p − e_y) x (empirical) and, for the true Fisher,
    Σ_c p_c ((e_c − p) x)²; a regression head of D outputs adds (2/D) x² per weight row (Gaussian of variance D/2)."""
    tasks = [Task("c", "classification", 3), Task("r", "regression", 2)]
    model = _linear(tasks)
    x, y = _data()
    src = TaskData(x, y)
    W, b = model.heads["c"].weight.detach(), model.heads["c"].bias.detach()
    V, a = model.heads["r"].weight.detach(), model.heads["r"].bias.detach()
    p = F.softmax(x @ W.T + b, -1)
    onehot = F.one_hot(y["c"].long(), 3).float()
    f = x @ V.T + a  # the row loss is the mean of (f_d − y_d)² over D = 2 outputs: its gradient in f is f − y
    emp = {"heads.c.weight": (((p - onehot)[:, :, None] * x[:, None, :]) ** 2).mean(0),
           "heads.c.bias": ((p - onehot) ** 2).mean(0),
           "heads.r.weight": (((f - y["r"])[:, :, None] * x[:, None, :]) ** 2).mean(0),
           "heads.r.bias": ((f - y["r"]) ** 2).mean(0)}
    got = fisher_diagonal(model, [src], tasks, "empirical", CPU)
    assert set(got) == set(emp)
    for n in emp:
        torch.testing.assert_close(got[n], emp[n], rtol=1e-5, atol=1e-7)

    eye = torch.eye(3)
    true_w = sum(p[:, c, None, None] * (((eye[c] - p)[:, :, None] * x[:, None, :]) ** 2) for c in range(3)).mean(0)
    true_b = sum(p[:, c, None] * ((eye[c] - p) ** 2) for c in range(3)).mean(0)
    got = fisher_diagonal(model, [src], tasks, "true", CPU)
    torch.testing.assert_close(got["heads.c.weight"], true_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["heads.c.bias"], true_b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["heads.r.weight"], (2 / 2 * x ** 2).mean(0).expand(2, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["heads.r.bias"], torch.full((2,), 2 / 2), rtol=1e-5, atol=1e-7)
    # a missing label (NaN) contributes nothing to its task's Fisher
    y_missing = {"c": y["c"].clone(), "r": y["r"]}
    y_missing["c"][0] = float("nan")
    part = fisher_diagonal(model, [TaskData(x, y_missing)], tasks[:1], "empirical", CPU)
    want = (((p - onehot)[1:, :, None] * x[1:, None, :]) ** 2).sum(0) / len(x)
    torch.testing.assert_close(part["heads.c.weight"], want, rtol=1e-5, atol=1e-7)


def test_ewc_penalty_gradient_is_lambda_fisher_times_displacement():
    tasks = [Task("c", "classification", 3)]
    model = _linear(tasks)
    ewc = EWC(EWCParams(**{"lambda": 7.0}))
    g = torch.Generator().manual_seed(3)
    params = trainable(model)
    ewc.terms = [({n: torch.rand(p.shape, generator=g) for n, p in params.items()},
                  {n: torch.randn(p.shape, generator=g) for n, p in params.items()}) for _ in range(2)]
    ewc.extra_loss(_run(model), None).backward()
    for n, p in params.items():
        want = 7.0 * sum(fk[n] * (p.detach() - ak[n]) for fk, ak in ewc.terms)
        torch.testing.assert_close(p.grad, want)


def test_online_ewc_decays_and_sums_the_fishers_separate_keeps_each():
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    torch.manual_seed(0)
    model = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [8]})
    online = EWC(EWCParams(mode="online", decay=0.5))
    separate = EWC(EWCParams())
    fishers, anchors = [], []
    for i in range(3):
        with torch.no_grad():  # a different model at the end of each experience
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape))
        e = stream.experiences[i]
        fishers.append(fisher_diagonal(model, e.suite.splits["train"], e.tasks, "empirical", CPU))
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        online.end(model, stream, i, CPU)
        separate.end(model, stream, i, CPU)
    (running, anchor), = online.terms
    for n in running:
        want = sum(0.5 ** (2 - k) * fishers[k][n] for k in range(3))
        torch.testing.assert_close(running[n], want)
        torch.testing.assert_close(anchor[n], anchors[2][n])
    assert "heads.e3.weight" not in running  # a head no experience used yet has no Fisher
    assert {"heads.e0.weight", "heads.e2.weight"} <= set(running)
    assert len(separate.terms) == 3
    for k, (fk, ak) in enumerate(separate.terms):
        assert not any(n.startswith("heads.") and not n.startswith(f"heads.e{k}.") for n in fk)
        for n in fk:
            torch.testing.assert_close(fk[n], fishers[k][n])
            torch.testing.assert_close(ak[n], anchors[k][n])


def test_ewc_decay_belongs_to_online_mode():
    with pytest.raises(ConfigError, match=r"strategies\.0\.params.*decay applies to mode: online"):
        build_strategy("ewc", {"decay": 0.9}, "strategies.0.params")
    with pytest.raises(ConfigError, match=r"unknown key 'strategies\.0\.params\.lamda'"):
        build_strategy("ewc", {"lamda": 1.0}, "strategies.0.params")


# ---------------------------------------------------------------- SI


def test_si_path_integral_is_minus_gradient_times_step_on_two_sgd_steps():
    """The engine's order by hand: on_step, the method's backward, extra_loss (SI reads the task gradient), the
    optimiser step; ω = −Σ_t g_t ⊙ Δθ_t over the two steps (momentum makes Δθ not proportional to g), then
    Ω = max(0, ω / (Δ² + ξ)) at the experience's end, and the penalty pulls towards the final weights."""
    tasks = [Task("c", "classification", 3)]
    model = _linear(tasks)
    x, y = _data(8)
    si = SI(SIParams(c=0.5, xi=0.01))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    run = _run(model)
    si.init(run)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = {n: torch.zeros_like(p) for n, p in start.items()}
    for rows in (slice(0, 4), slice(4, 8)):
        si.on_step(run, None)
        opt.zero_grad()
        F.cross_entropy(model(x[rows], ["c"])["c"], y["c"][rows].long()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert si.extra_loss(run, None) is None  # the first experience: nothing to protect yet
        opt.step()
        for n, p in model.named_parameters():
            want[n] -= grads[n] * (p.detach() - before[n])
    si._flush(model)
    for n in want:
        torch.testing.assert_close(si.omega[n], want[n])
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)  # end() reads nothing from the stream
    si.end(model, stream, 0, CPU)
    (omega_big, anchor), = si.terms
    for n, p in model.named_parameters():
        big = torch.clamp(want[n] / ((p.detach() - start[n]) ** 2 + 0.01), min=0)
        torch.testing.assert_close(omega_big.get(n, torch.zeros_like(big)), big)
        if n in anchor:
            torch.testing.assert_close(anchor[n], p.detach())
    assert all(v.abs().sum() == 0 for v in si.omega.values()) and si.pending is None
    opt.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    si.extra_loss(run, None).backward()
    for n, p in model.named_parameters():
        if n in omega_big:
            torch.testing.assert_close(p.grad, 2 * 0.5 * omega_big[n] * (p.detach() - anchor[n]))


# ---------------------------------------------------------------- MAS


def test_mas_importance_equals_a_hand_computation_and_accumulates():
    """For a linear head f = Wx + b: ∂||f||²/∂W = 2 f xᵀ and ∂/∂b = 2f, so Ω = mean |2 f xᵀ|, mean |2f|."""
    tasks = [Task("c", "classification", 3), Task("r", "regression", 2)]
    model = _linear(tasks)
    x, y = _data()
    got = output_sensitivity(model, [TaskData(x, y)], ["c", "r"], CPU)
    for name in ("c", "r"):
        lin = model.heads[name]
        f = (x @ lin.weight.T + lin.bias).detach()
        torch.testing.assert_close(got[f"heads.{name}.weight"], (2 * f[:, :, None] * x[:, None, :]).abs().mean(0))
        torch.testing.assert_close(got[f"heads.{name}.bias"], (2 * f).abs().mean(0))
    # accumulation over experiences: the paper's sum, or Avalanche's running average with alpha
    stream = build_stream("split-digits", {"scenario": "domain"}, seed=0)
    torch.manual_seed(0)
    net = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [8]})
    summed, averaged, news = MAS(MASParams()), MAS(MASParams(alpha=0.25)), []
    for i in range(2):
        e = stream.experiences[i]
        news.append(output_sensitivity(net, e.suite.splits["train"], ["position"], CPU))
        summed.end(net, stream, i, CPU)
        averaged.end(net, stream, i, CPU)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5)
    for n in news[0]:
        torch.testing.assert_close(summed.terms[0][0][n], news[0][n] + news[1][n])
        torch.testing.assert_close(averaged.terms[0][0][n], 0.25 * 0.75 * news[0][n] + 0.75 * news[1][n])


# ---------------------------------------------------------------- LwF


def test_lwf_distils_the_old_classes_of_each_scenario():
    task = build_stream("split-digits", {"scenario": "task"}, seed=0)
    assert old_outputs(task, 0) == {} and old_outputs(task, 2) == {"e0": [0, 1], "e1": [0, 1]}
    cls = build_stream("split-digits", {"scenario": "class"}, seed=0)
    assert old_outputs(cls, 2) == {"class": [0, 1, 2, 3]}  # positions in the class order, not yet classes 4..9
    dom = build_stream("split-digits", {"scenario": "domain"}, seed=0)
    assert old_outputs(dom, 1) == {"position": [0, 1]}
    logits = torch.randn(5, 4, requires_grad=True)
    same = distillation(logits, logits.detach(), 2.0)
    same.backward()
    assert float(same.detach().abs()) < 1e-6 and float(logits.grad.abs().max()) < 1e-6
    t = 2.0
    old = torch.randn(5, 4)
    q = F.softmax(old / t, -1)
    want = (q * (q.log() - F.log_softmax(logits / t, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation(logits, old, t), want)


# ---------------------------------------------------------------- the flow


def _config(tmp_path, strategies, scenario, name, **train):
    """Split-digits in 2 experiences of 5 classes, a 32-unit MLP, SGD: seconds per strategy."""
    return {"seeds": [0], "stream": {"name": "split-digits",
                                     "params": {"scenario": scenario, "classes_per_experience": 5}},
            "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
            "train": {"epochs": 2, "batch_size": 64, "checkpoint_every": 0, "checkpoint_interval_s": 0,
                      "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, **train},
            "strategies": strategies, "output": {"dir": str(tmp_path), "name": name}}


def test_zero_strength_equals_naive_bit_for_bit(tmp_path):
    """EWC with λ 0, SI with c 0, MAS with λ 0 and LwF with α 0 compute their terms (a zero gradient is added) and
    must train exactly the weights naive trains, experience after experience, in the task scenario (several heads:
    the old task's head gets a zero gradient it would not get under naive)."""
    zero = [{"name": "ewc", "params": {"lambda": 0}}, {"name": "si", "params": {"c": 0}},
            {"name": "mas", "params": {"lambda": 0}}, {"name": "lwf", "params": {"alpha": 0}}]
    run_dir, summary = continual(ContinualConfig.model_validate(_config(tmp_path, ["naive", *zero], "task", "zero")))
    naive = summary["results"]["naive"][0]
    for s in zero:
        assert summary["results"][s["name"]][0]["accuracy"] == naive["accuracy"], s
        for i in range(2):
            want = checkpoint.load(run_dir / "jobs" / "naive-s0" / f"e{i}" / "end.safetensors")["model"]
            saved = checkpoint.load(run_dir / "jobs" / f"{s['name']}-s0" / f"e{i}" / "end.safetensors")
            assert all(torch.equal(saved["model"][k], want[k]) for k in want), (s, i)
            assert saved["strategy"]  # it did keep its state (Fishers, importances, the old model)


def test_each_forgets_less_than_naive_on_domain_incremental_split_digits(tmp_path):
    """With their default parameters, on the domain scenario (one head; the second experience's digits 5-9 reuse
    the first's labels 0-4), where naive forgets most of the first experience (~0.6 at this seed)."""
    sgd = {"epochs": 5, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}
    names = ["naive", "ewc", "si", "mas", "lwf"]
    _, summary = continual(ContinualConfig.model_validate(_config(tmp_path, names, "domain", "behaviour", **sgd)))
    forgetting = {n: summary["results"][n][0]["metrics"]["forgetting"] for n in names}
    assert forgetting["naive"] > 0.4, forgetting
    for n in names[1:]:
        assert forgetting[n] < forgetting["naive"] - 0.03, (n, forgetting)


def test_every_scenario_runs_including_a_multitask_stream_of_regression_tasks(tmp_path):
    """Regression heads take the regression branches (the Gaussian Fisher, distillation by squared error)."""
    strategies = [{"name": "ewc", "params": {"fisher": "true", "mode": "online", "decay": 0.9}}, "si", "mas", "lwf"]
    cfg = _config(tmp_path, strategies, "task", "multitask", epochs=1)
    cfg["stream"] = {"name": "suite", "params": {"name": "synthetic", "params": {
        "d": 6, "groups": [2], "unrelated": 1, "n_train": 40, "n_val": 16, "n_test": 16}}}
    _, summary = continual(ContinualConfig.model_validate(cfg))
    assert summary["stream"]["scenario"] == "multitask"
    for name in ("ewc", "si", "mas", "lwf"):
        r = summary["results"][name][0]
        assert len(r["accuracy"]) == 5 and all(v == v for row in r["accuracy"] for v in row)  # no NaN
        assert r["state_numel"] > 0
