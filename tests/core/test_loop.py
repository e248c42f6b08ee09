"""The training loop: masked labels, multi-input suites, batch order."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.config import Config, MethodConfig
from polytask.engine.data import epoch_batches
from polytask.engine.loop import evaluate, task_losses
from polytask.flows.jobs import Job, train_configured
from polytask.models import build_model
from polytask.tasks import Task, TaskData, TaskSuite, build_suite


def small_config(**train):
    return Config.model_validate({"model": {"backbone_params": {"hidden": [16]}},
                                  "train": {"epochs": 2, "batch_size": 32, **train}})


def test_masked_task_trains_and_evaluates_on_labelled_rows_only(tmp_path):
    suite = build_suite("synthetic", {"d": 6, "groups": [2], "unrelated": 0, "conflicting_pairs": 0,
                                      "n_train": 400, "n_val": 200, "n_test": 200,
                                      "missing": {"g0_t1": 0.3}}, seed=0)
    y = suite.splits["train"][0].y["g0_t1"]
    assert 0.25 < torch.isnan(y).float().mean() < 0.35
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    result = train_configured(job, suite, small_config(), tmp_path)
    assert all(math.isfinite(r["loss"]) for r in result["history"])
    # evaluation uses exactly the labelled rows: recompute by hand on them
    model = build_model(suite.tasks, suite.input_shape, "mlp", {"hidden": [16]})
    test = suite.splits["test"][0]
    scores = evaluate(model, [test], suite.tasks)
    keep = ~torch.isnan(test.y["g0_t1"])
    with torch.no_grad():
        pred = model(test.x[keep])["g0_t1"].squeeze(-1)
        full = model(test.x)["g0_t0"].squeeze(-1)
    assert scores["g0_t1"]["mse"] == torch.mean((pred - test.y["g0_t1"][keep]) ** 2).item()
    # the other task keeps every row
    assert scores["g0_t0"]["mse"] == torch.mean((full - test.y["g0_t0"]) ** 2).item()


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_mean_loss_is_the_mean_of_the_row_losses(kind):
    task = Task("t", kind, 3)
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(8, 3, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen).float() if kind == "classification" else torch.randn(8, 3)
    torch.testing.assert_close(task.mean_loss(out, y), task.loss(out, y).mean())


def test_a_cut_timing_file_does_not_stop_a_resume(tmp_path):
    """timing.json is written without fsync: after an OS crash it may be cut; the job resumes from its checkpoint
    all the same, counting its time from the resumption."""
    from polytask.engine.data import TensorBatches
    from polytask.engine.loop import train_job
    from polytask.engine.optim import optimizer
    from polytask.engine.spec import CheckpointPolicy, TrainSpec
    from polytask.engine.step import build_method

    suite = multi_input_suite()

    def spec(epochs):
        return TrainSpec(name="cut", tasks=list(suite.tasks),
                         model=lambda: build_model(suite.tasks, suite.input_shape, "mlp", {"hidden": [8]}),
                         optimizer=optimizer("sgd", {"lr": 0.1}), method=build_method(MethodConfig(name="equal"),
                                                                                      suite.task_names),
                         data=TensorBatches(suite.splits, batch_size=64), epochs=epochs,
                         checkpoint=CheckpointPolicy(tmp_path, 0), seed=0)

    train_job(spec(1))
    timing = tmp_path / "timing.json"
    assert json.loads(timing.read_text())["elapsed"] > 0
    timing.write_text('{"elapsed": 1')
    result = train_job(spec(2))
    assert [r["epoch"] for r in result["history"] if r["split"] == "val" and r["task"] == "a"] == [1, 2]
    assert result["wall_time_s"] > 0 and json.loads(timing.read_text())["elapsed"] == pytest.approx(
        result["wall_time_s"], abs=0.5)


def test_batch_with_no_label_gives_zero_loss_with_graph():
    task = Task("t", "regression", 1)
    other = Task("u", "regression", 1)
    data = TaskData(torch.randn(4, 3), {"t": torch.full((4,), float("nan")), "u": torch.randn(4)})
    model = build_model([task, other], (3,), "mlp", {"hidden": [4]})
    losses = task_losses(model, [data], [torch.arange(4)], [task, other])
    assert losses[0] == 0 and losses[1] > 0
    losses.sum().backward()


def multi_input_suite():
    gen = torch.Generator().manual_seed(0)

    def src(n, name):
        x = torch.randn(n, 5, generator=gen)
        return TaskData(x, {name: (x[:, 0] > 0).float()})

    splits = {s: (src(n, "a"), src(n // 3, "b")) for s, n in [("train", 300), ("val", 90), ("test", 90)]}
    tasks = (Task("a", "classification", 2), Task("b", "classification", 2))
    return TaskSuite("two-inputs", tasks, splits)


def multi_input_job(folder, optimizer, epochs, interval, hooks=(), final=True, name="job"):
    """A TrainSpec of an 8-unit MLP on :func:`multi_input_suite` (equal weights, batch 64, seed 0) checkpointing
    to ``folder`` at most once per ``interval`` seconds."""
    from polytask.engine.data import TensorBatches
    from polytask.engine.spec import CheckpointPolicy, TrainSpec
    from polytask.engine.step import build_method

    suite = multi_input_suite()
    return TrainSpec(name=name, tasks=list(suite.tasks), final=final,
                     model=lambda: build_model(suite.tasks, suite.input_shape, "mlp", {"hidden": [8]}),
                     optimizer=optimizer, method=build_method(MethodConfig(name="equal"), suite.task_names),
                     data=TensorBatches(suite.splits, batch_size=64), epochs=epochs,
                     checkpoint=CheckpointPolicy(folder, 0, interval), seed=0, hooks=hooks)


def stop_after(epoch):
    """A hook that interrupts a job (KeyboardInterrupt) at the end of ``epoch``."""
    from polytask.engine.hooks import Hook

    class Stop(Hook):
        name = "stop"

        def on_epoch(self, run, done):
            if done == epoch:
                raise KeyboardInterrupt
    return Stop()


def test_multi_input_suite_trains(tmp_path):
    suite = multi_input_suite()
    assert suite.multi_input
    job = Job("equal", ("a", "b"), MethodConfig(name="equal"), "joint")
    result = train_configured(job, suite, small_config(epochs=3, optimizer={"lr": 0.02}), tmp_path)
    assert result["test"]["a"]["accuracy"] > 0.8 and result["test"]["b"]["accuracy"] > 0.7
    assert result["steps"] == 3 * math.ceil(300 / 32)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=3), bs=st.integers(1, 64),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_epoch_batches(sizes, bs, seed, epoch):
    batches = epoch_batches(sizes, bs, seed, epoch)
    assert len(batches) == max(math.ceil(n / bs) for n in sizes)
    big = sizes.index(max(sizes))
    seen = torch.cat([b[big] for b in batches])
    assert sorted(seen.tolist()) == list(range(sizes[big]))  # the largest source: each row once
    for s, n in enumerate(sizes):
        assert all(len(b[s]) <= bs and (len(b[s]) == 0 or int(b[s].max()) < n) for b in batches)
    again = epoch_batches(sizes, bs, seed, epoch)
    assert all(torch.equal(a, b) for x, y in zip(batches, again, strict=False) for a, b in zip(x, y, strict=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 9), st.integers(0, 2**32 + 5), st.integers(0, 2**100)), max_size=9))
def test_key_seed_is_numpys_seed_sequence(key):
    """The batch order's seed is numpy's SeedSequence state (computed in Python): keys of any length (beyond the
    pool of 4 words too), integers of several 32-bit words, zeros; a negative integer is refused as numpy does."""
    import numpy as np

    from polytask.engine.data import key_seed

    want = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)
    assert key_seed(key) == want
    with pytest.raises(ValueError, match="negative"):
        key_seed([*key, -1])


def _fresh_thread(fn, *args):
    """``fn(*args)`` on a new thread: with none of this thread's kept blocks (what a resumed process starts from)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


@settings(max_examples=60, deadline=None)
@given(n_rows=st.sampled_from([1, 2, 7, 200, 70_000]), n=st.integers(1, 300), key=st.lists(st.integers(0, 2**40),
       max_size=4), steps=st.lists(st.integers(0, 200), min_size=1, max_size=12))
def test_step_rows_are_a_sample_without_replacement_that_any_visit_order_draws_again(n_rows, n, key, steps):
    """Each step's rows are min(n, n_rows) distinct rows; a step drawn cold (another thread, as after a resume), in
    any order of steps and with rows growing between steps (a buffer filled as steps train), gives the same rows as
    drawn in sequence (one step's keys at a time or the block's at once); steps and keys draw differently."""
    from polytask.engine.data import step_rows

    for s, m in [(s, n_rows) for s in steps] + [(s, n_rows + 9 * j) for j, s in enumerate(steps)]:  # then growing
        rows = step_rows(m, n, s, *key)
        assert len(rows) == min(n, m) and len(set(rows.tolist())) == len(rows)
        assert int(rows.min()) >= 0 and int(rows.max()) < m
        assert torch.equal(rows, _fresh_thread(step_rows, m, n, s, *key))
    if n_rows >= 7 and n < n_rows:  # two blocks alike, or alike under another key: p < 7**-32
        run = [tuple(step_rows(n_rows, n, s, *key).tolist()) for s in range(64)]
        assert run[:32] != run[32:] and run != [tuple(step_rows(n_rows, n, s, *key, 1).tolist()) for s in range(64)]


def test_step_rows_are_uniform_in_membership_and_order():
    """Over 6,000 steps (188 blocks) of 2 rows of 5: each row is drawn, and comes first, 1/5 of the time and each
    ordered pair 1/20, within 4 standard errors (a fixed key: the check cannot flake)."""
    from polytask.engine.data import step_rows

    draws = torch.stack([step_rows(5, 2, s, 11, 3) for s in range(6000)])
    for counts, p, m in ((torch.bincount(draws.flatten(), minlength=5), 2 / 5, 6000),
                         (torch.bincount(draws[:, 0], minlength=5), 1 / 5, 6000),
                         (torch.bincount(draws[:, 0] * 5 + draws[:, 1], minlength=25)[[i * 5 + j for i in range(5)
                                                                                         for j in range(5) if i != j]],
                          1 / 20, 6000)):
        assert (counts.double() - p * m).abs().max() < 4 * (m * p * (1 - p)) ** 0.5, counts.tolist()


def test_init_from_loads_matching_tensors(tmp_path):
    from safetensors.torch import save_file

    from polytask.engine.loop import load_matching
    from polytask.errors import CheckpointError

    tasks = [Task("a", "classification", 2)]
    src = build_model(tasks, (5,), "mlp", {"hidden": [4]})
    save_file({k: v for k, v in src.state_dict().items() if k.startswith("encoder.")}, tmp_path / "enc.safetensors")
    dst = build_model(tasks, (5,), "mlp", {"hidden": [4]})
    assert load_matching(dst, str(tmp_path / "enc.safetensors")) == ["encoder.0.bias", "encoder.0.weight"]
    assert torch.equal(dst.encoder[0].weight, src.encoder[0].weight)
    assert not torch.equal(dst.heads["a"].weight, src.heads["a"].weight)
    save_file({"other": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors has no tensor matching"):
        load_matching(dst, str(tmp_path / "bad.safetensors"))


def _diverging_suite():
    """A regression target around 1e30: its squared error overflows float32 on the first step."""
    gen = torch.Generator().manual_seed(0)

    def src(n):
        x = torch.randn(n, 4, generator=gen)
        return TaskData(x, {"a": (x[:, 0] > 0).float(), "huge": 1e30 * (1 + x[:, 1])})

    splits = {s: (src(n),) for s, n in [("train", 64), ("val", 32), ("test", 32)]}
    return TaskSuite("huge", (Task("a", "classification", 2), Task("huge", "regression", 1)), splits)


@pytest.mark.parametrize("case", ["huge_target", "sgd_lr_10"])
def test_divergence_is_one_error_naming_job_task_and_epoch(tmp_path, case):
    """A diverging job ends in a DivergenceError naming where it happened, not in a TypeError about a
    missing best model (every validation score was NaN, so no epoch was ever best)."""
    from polytask.errors import DivergenceError

    if case == "huge_target":
        suite, cfg, task = _diverging_suite(), small_config(), "huge"
    else:
        suite = build_suite("synthetic", {"d": 6, "groups": [2], "unrelated": 0, "conflicting_pairs": 0,
                                          "n_train": 200, "n_val": 100, "n_test": 100}, seed=0)
        cfg, task = small_config(optimizer={"name": "sgd", "lr": 10.0}), "g0_t0"
    job = Job("equal", tuple(suite.task_names), MethodConfig(name="equal"), "joint")
    with pytest.raises(DivergenceError, match=rf"^job 'equal' diverged: task '{task}'.* at epoch 1, step \d+ "):
        train_configured(job, suite, cfg, tmp_path)


def test_optimisers_and_schedulers_come_from_their_registries():
    """The config's names are exactly the registered ones; a typo names the key and suggests the name meant."""
    from typing import get_args

    from polytask.config import OptimizerConfig, SchedulerConfig
    from polytask.engine.optim import OPTIMIZERS, SCHEDULERS, optimizer, scheduler
    from polytask.errors import ConfigError

    assert set(get_args(OptimizerConfig.model_fields["name"].annotation)) == set(OPTIMIZERS.names())
    assert set(get_args(SchedulerConfig.model_fields["name"].annotation)) == set(SCHEDULERS.names())
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = optimizer("sgd", {"lr": 0.5, "momentum": 0.0})(params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5
    sched = scheduler("step", {"step_size": 2, "gamma": 0.5})(opt, 10)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.25
    assert scheduler("none") is None
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamm' \(did you mean 'adam'\?\)"):
        optimizer("adamm")
    with pytest.raises(ConfigError, match=r"unknown key 'train.optimizer.momentum'"):
        optimizer("adam", {"momentum": 0.9}, where="train.optimizer")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimisers_follow_the_default_ones_and_resume_exactly(name, tmp_path):
    """``train.optimizer.fused``: torch's fused implementation, asked for only when set (the default is torch's own
    default, as before the option); its steps agree with the default's to float rounding, and a job stopped after
    an epoch resumes to the same bytes as an uninterrupted one."""
    from polytask.config import TrainConfig
    from polytask.engine import checkpoint
    from polytask.engine.loop import train_job
    from polytask.flows.jobs import optimizer_of

    def opt(fused):
        cfg = TrainConfig.model_validate({"optimizer": {"name": name, "lr": 0.01, "weight_decay": 0.01,
                                                        **({"fused": True} if fused else {})}})
        return optimizer_of(cfg)

    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    plain, fused = opt(False)(a.parameters()), opt(True)(b.parameters())
    assert not plain.defaults["fused"] and fused.defaults["fused"] is True
    for _ in range(20):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        plain.step()
        fused.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)

    def spec(folder, hooks=()):
        return multi_input_job(folder, opt(True), 3, 0.0, hooks, name="fused")

    whole = train_job(spec(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train_job(spec(tmp_path / "stopped", [stop_after(2)]))
    resumed = train_job(spec(tmp_path / "stopped"))
    assert resumed["history"] == whole["history"]
    x, y = (checkpoint.load(tmp_path / n / "last.safetensors") for n in ("whole", "stopped"))
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])


def test_checkpoint_interval_skips_intermediate_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """``CheckpointPolicy.interval``: within it of the previous checkpoint or of the job's start, an epoch's
    checkpoint is skipped (a final job's last is always written, a non-final job's is not); a job stopped after a
    skipped one resumes from the older checkpoint, or from its start, and ends exactly where an uninterrupted job
    ends."""
    from polytask.engine import checkpoint
    from polytask.engine.loop import train_job
    from polytask.engine.optim import optimizer

    saved = []
    real_save = checkpoint.BackgroundWriter.save

    def save(self, path, tree, then=None):
        saved.append(tree["position"]["epoch"])
        real_save(self, path, tree, then)

    monkeypatch.setattr(checkpoint.BackgroundWriter, "save", save)

    def spec(folder, interval, hooks=(), final=True):
        return multi_input_job(folder, optimizer("sgd", {"lr": 0.1, "momentum": 0.9}), 4, interval, hooks, final,
                               name="iv")

    whole = train_job(spec(tmp_path / "whole", 0.0))
    assert saved == [1, 2, 3, 4]
    saved.clear()
    train_job(spec(tmp_path / "sparse", 1e9))
    assert saved == [4]  # only a final job's last
    saved.clear()
    train_job(spec(tmp_path / "not-final", 1e9, final=False))
    assert saved == []
    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        train_job(spec(tmp_path / "stopped", 0.0, [stop_after(3)]))
    assert saved == [1, 2]
    saved.clear()
    with pytest.raises(KeyboardInterrupt):  # within the interval of its start: no checkpoint
        train_job(spec(tmp_path / "never", 1e9, [stop_after(3)]))
    assert saved == [] and not (tmp_path / "never" / "last.safetensors").exists()
    resumed = train_job(spec(tmp_path / "stopped", 1e9))  # from epoch 2: epoch 3's skipped, the last written
    restarted = train_job(spec(tmp_path / "never", 1e9))  # from the start
    assert saved == [4, 4]
    assert resumed["history"] == whole["history"] == restarted["history"]
    for name in ("whole", "stopped", "never"):
        assert (tmp_path / name / "best.safetensors").is_file()
    a, b, c = (checkpoint.load(tmp_path / n / "last.safetensors") for n in ("whole", "stopped", "never"))
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["model"][k], c["model"][k])
               for k in a["model"])
