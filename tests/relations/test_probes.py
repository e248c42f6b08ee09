"""Affinity probes: exact virtual optimiser steps, planted affinities, and no effect on the run."""

import copy

import pytest
import torch

from polytask.config import Config, MethodConfig
from polytask.flows.jobs import Job, train_configured
from polytask.relations.probes import DataMap, GradCosine, Lookahead, ProbeSet, virtual_update
from polytask.tasks import build_suite


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, dampening=0.0),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
])
@pytest.mark.parametrize("warm_steps", [0, 3])
def test_virtual_update_equals_a_real_step(make_opt, warm_steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = make_opt(model.parameters())
    x = torch.randn(8, 4)
    for _ in range(warm_steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    grads = [torch.randn_like(p) for p in model.parameters()]
    predicted = virtual_update(opt, list(model.parameters()), grads)
    real_model, real_opt = copy.deepcopy((model, opt))
    for p, g in zip(real_model.parameters(), grads, strict=True):
        p.grad = g.clone()
    real_opt.step()
    for want, got in zip(real_model.parameters(), predicted, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), real_model.parameters(), strict=True))


def small(epochs=2):
    return Config.model_validate({"model": {"backbone_params": {"hidden": [32, 16]}},
                                  "train": {"epochs": epochs, "batch_size": 64, "optimizer": {"lr": 0.01}}})


SUITE = {"d": 8, "groups": [2], "unrelated": 0, "conflicting_pairs": 1, "noise": 0.05, "n_train": 640,
         "n_val": 64, "n_test": 64, "task_jitter": 0.05}


def test_lookahead_and_cosine_see_planted_structure(tmp_path):
    suite = build_suite("synthetic", SUITE, seed=1)
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    probes = ProbeSet([Lookahead(every=2), GradCosine(every=2)])
    train_configured(job, suite, small(), tmp_path, hooks=[probes])
    names = suite.task_names  # g0_t0, g0_t1, c0_a, c0_b
    z = Lookahead().result(probes.states["lookahead"])
    cos = GradCosine().result(probes.states["grad_cosine"])
    a, b = names.index("g0_t0"), names.index("g0_t1")
    ca, cb = names.index("c0_a"), names.index("c0_b")
    assert z[a, b] > 0 and z[b, a] > 0  # same teacher: a step for one helps the other
    assert cos[a, b] > 0.3 and cos[a, ca] < 0.2 and cos[a, cb] < 0.2
    assert z[a, b] > z[a, ca] and z[a, b] > z[a, cb]
    assert probes.calls["lookahead"] == 10 and probes.seconds > 0


def test_probes_do_not_change_the_run_and_resume_exactly(tmp_path):
    suite = build_suite("synthetic", {**SUITE, "n_train": 320}, seed=2)
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    cfg = Config.model_validate({**small(3).model_dump(), "train": {**small(3).train.model_dump(),
                                                                    "checkpoint_every": 3}})
    plain = train_configured(job, suite, cfg, tmp_path / "plain")
    probed = ProbeSet([Lookahead(every=2), DataMap()])
    with_probes = train_configured(job, suite, cfg, tmp_path / "probed", hooks=[probed])
    assert plain["test"] == with_probes["test"]

    # resume from the mid-run checkpoint: same affinity and data map as the straight run
    import shutil

    from polytask.engine import checkpoint

    ckpt = checkpoint.load(tmp_path / "probed" / "last.safetensors")
    assert ckpt["hooks"]["probes"] is not None
    (tmp_path / "again").mkdir()
    shutil.copy(tmp_path / "probed" / "last.safetensors", tmp_path / "again" / "last.safetensors")
    again = ProbeSet([Lookahead(every=2), DataMap()])
    # the final checkpoint holds the finished run: resuming it only re-evaluates the test set
    train_configured(job, suite, cfg, tmp_path / "again", hooks=[again])
    torch.testing.assert_close(Lookahead().result(again.states["lookahead"]),
                               Lookahead().result(probed.states["lookahead"]), rtol=0, atol=0)
    dm = DataMap().result(probed.states["datamap"])
    assert dm.shape == (4, 2 * 320) and probed.states["datamap"]["n"] == 3
    assert torch.all((dm[:, :320] >= 0) & (dm[:, :320] <= 1))


def test_virtual_update_batched_rows_equal_single_updates():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    for opt in (torch.optim.Adam(model.parameters(), lr=0.01), torch.optim.SGD(model.parameters(), lr=0.1,
                                                                               momentum=0.9)):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        params = list(model.parameters())
        batched = [torch.randn(5, *p.shape) for p in params]
        together = virtual_update(opt, params, batched)
        for i in range(5):
            alone = virtual_update(opt, params, [b[i] for b in batched])
            for a, t in zip(alone, together, strict=True):
                torch.testing.assert_close(t[i], a)


def _warm_model_and_opt(make_opt):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = make_opt(model.parameters())
    x = torch.randn(8, 4)
    for _ in range(3):  # build up momentum / Adam moments
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01),
])
def test_sgd_lookahead_is_the_papers_step_whatever_the_optimiser_state(make_opt):
    """TAG Eq. 2: theta - lr * grad L_i, at the run's lr, with no momentum, Adam moments or weight decay."""
    from polytask.relations.probes import sgd_update

    model, opt = _warm_model_and_opt(make_opt)
    params = list(model.parameters())
    grads = [torch.randn(2, *p.shape) for p in params]  # two tasks' gradients
    lr = opt.param_groups[0]["lr"]
    stepped = sgd_update(opt, params, grads)
    for p, g, s in zip(params, grads, stepped, strict=True):
        torch.testing.assert_close(s, p.detach()[None] - lr * g, rtol=0, atol=0)
    for p, s in zip(params, sgd_update(opt, params, grads, lr=0.5), strict=True):
        assert not torch.equal(s[0], p.detach())
    # the optimiser rule (the option) is a different step here: it carries the run's state
    ruled = virtual_update(opt, params, grads)
    assert not all(torch.allclose(a, b) for a, b in zip(stepped, ruled, strict=True))


def test_lookahead_default_ignores_optimiser_state_and_option_keeps_it(tmp_path):
    suite = build_suite("synthetic", {**SUITE, "n_train": 128}, seed=4)
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    cfg = Config.model_validate({**small(1).model_dump(), "train": {**small(1).train.model_dump(),
                                                                    "optimizer": {"name": "sgd", "lr": 0.05,
                                                                                  "momentum": 0.9}}})
    probes = ProbeSet([Lookahead(every=1), Lookahead(every=1, update="optimizer")])
    probes.probes[1].name = "lookahead_optimizer"
    train_configured(job, suite, cfg, tmp_path, hooks=[probes])
    paper = Lookahead().result(probes.states["lookahead"])
    rule = Lookahead().result(probes.states["lookahead_optimizer"])
    assert probes.calls["lookahead"] == 2 and not torch.allclose(paper, rule)

    # by hand: one probed batch, the paper's step with lr 0.05 and the optimiser ignored entirely
    from polytask.engine.loop import task_losses
    from polytask.engine.step import parameter_grads
    from polytask.models import build_model
    from polytask.relations.probes import ProbeBatch

    torch.manual_seed(0)
    tasks = suite.tasks
    model = build_model(tasks, suite.input_shape, "mlp", {"hidden": [8]}, "hard", {})
    model.eval()
    sources, rows = suite.splits["train"], [torch.arange(32)]
    fresh = torch.optim.SGD(model.parameters(), lr=0.05)
    warm = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for p in model.parameters():  # a momentum buffer that the paper's step must not read
        warm.state[p]["momentum_buffer"] = torch.randn_like(p)
    tg, blocks = parameter_grads(model, sources, rows, tasks, task_losses, 0)
    shared = list(model.shared_parameters())
    z = Lookahead(every=1).matrix(ProbeBatch(model, warm, sources, rows, tasks))
    assert torch.equal(z, Lookahead(every=1).matrix(ProbeBatch(model, fresh, sources, rows, tasks)))
    k = len(tasks)
    for i in range(k):
        moved = [p.detach() - 0.05 * b[i].reshape(p.shape) for p, b in zip(shared, blocks, strict=True)]
        names = {id(p): n for n, p in model.named_parameters()}
        params = {names[id(p)]: v for p, v in zip(shared, moved, strict=True)}
        with torch.no_grad():
            after = task_losses(lambda x, t=None, params=params: torch.func.functional_call(model, params, (x, t)),
                                sources, rows, tasks)
        want = 1 - after.double() / tg.losses.detach().double()
        torch.testing.assert_close(z[i], want, rtol=1e-5, atol=1e-7)
    with_rule = Lookahead(every=1, update="optimizer").matrix(ProbeBatch(model, warm, sources, rows, tasks))
    assert not torch.allclose(with_rule, z)


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Sleeper(GradCosine):
    """grad_cosine that takes `own` fake seconds of its own (after reading the gradients)."""

    def __init__(self, clock, own, name, every=1):
        super().__init__(every)
        self.clock, self.own, self.name = clock, own, name

    def step(self, state, batch):
        batch.grads()
        self.clock.now += self.own
        return state


def test_each_probe_is_timed_on_its_own(monkeypatch):
    """Per-estimator cost: each probe's own seconds, plus the shared gradient pass it read (its cost alone)."""
    from polytask.engine import step as step_mod

    clock = _FakeClock()
    suite = build_suite("synthetic", {**SUITE, "n_train": 64}, seed=5)
    from polytask.models import build_model

    model = build_model(suite.tasks, suite.input_shape, "mlp", {"hidden": [4]}, "hard", {})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real = step_mod.parameter_grads

    def slow_grads(*args):  # computing the gradients costs 2 fake seconds
        clock.now += 2.0
        return real(*args)

    monkeypatch.setattr(step_mod, "parameter_grads", slow_grads)
    fast, slow = _Sleeper(clock, 1.0, "fast"), _Sleeper(clock, 5.0, "slow")
    dm = DataMap()
    ps = ProbeSet([fast, slow, dm], clock=clock)
    ps.start(len(suite.tasks))
    for step in range(3):
        ps.probe(step, model, opt, suite.splits["train"], [torch.arange(16)], suite.tasks)
    assert ps.cost("fast") == {"own_time_s": 3.0, "gradient_time_s": 6.0, "probe_time_s": 9.0}
    assert ps.cost("slow") == {"own_time_s": 15.0, "gradient_time_s": 6.0, "probe_time_s": 21.0}
    assert ps.cost("datamap")["probe_time_s"] == 0.0
    assert ps.seconds == 3 * (2.0 + 1.0 + 5.0)  # the run's total probing time counts the gradients once
    again = ProbeSet([fast, slow, dm])
    again.start(len(suite.tasks))
    again.load_state_dict(ps.state_dict())
    again.load_timing(ps.timing())
    assert again.cost("slow") == ps.cost("slow")


def test_probed_runs_write_identical_checkpoints_and_resume_their_clocks(tmp_path):
    """Probe wall times live in timing.json, not in the checkpoint: two identical probed runs write the same bytes,
    and a resumed run keeps the time measured before it stopped."""
    import json

    suite = build_suite("synthetic", {**SUITE, "n_train": 128}, seed=3)
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    for name in ("a", "b"):
        train_configured(job, suite, small(1), tmp_path / name,
                         hooks=[ProbeSet([Lookahead(every=1), GradCosine(every=1)])])
    assert (tmp_path / "a" / "last.safetensors").read_bytes() == (tmp_path / "b" / "last.safetensors").read_bytes()
    clocks = json.loads((tmp_path / "a" / "timing.json").read_text())["hooks"]["probes"]
    assert clocks["seconds"] > 0 and clocks["timing"]["lookahead"]["own_s"] > 0
    resumed = ProbeSet([Lookahead(every=1), GradCosine(every=1)])
    train_configured(job, suite, small(1), tmp_path / "a", hooks=[resumed])
    assert resumed.seconds >= clocks["seconds"] and resumed.cost("lookahead")["own_time_s"] > 0
