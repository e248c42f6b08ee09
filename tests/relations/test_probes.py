"""Affinity probes: exact virtual optimiser steps, planted affinities, and no effect on the run."""

import copy

import pytest
import torch

from polytask.config import Config, MethodConfig
from polytask.engine.loop import Job, train_job
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
    train_job(job, suite, small(), tmp_path, probes=probes)
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
    plain = train_job(job, suite, cfg, tmp_path / "plain")
    probed = ProbeSet([Lookahead(every=2), DataMap()])
    with_probes = train_job(job, suite, cfg, tmp_path / "probed", probes=probed)
    assert plain["test"] == with_probes["test"]

    # resume from the mid-run checkpoint: same affinity and data map as the straight run
    import shutil

    from polytask.engine import checkpoint

    ckpt = checkpoint.load(tmp_path / "probed" / "last.safetensors")
    assert ckpt["probes"] is not None
    (tmp_path / "again").mkdir()
    shutil.copy(tmp_path / "probed" / "last.safetensors", tmp_path / "again" / "last.safetensors")
    again = ProbeSet([Lookahead(every=2), DataMap()])
    # the final checkpoint holds the finished run: resuming it only re-evaluates the test set
    train_job(job, suite, cfg, tmp_path / "again", probes=again)
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
