"""Mixed precision and gradient accumulation: accumulate=N over micro-batches of B/N rows gives the update of one
batch of B rows for weightings and aggregators in both modes; bf16 autocast leaves the per-task gradients float32 and
the Gramian float64; a job killed between micro-batches or while writing a checkpoint resumes bit-identically.

Run as a script (``python test_precision_accumulation.py JOB_DIR``), this module trains the bf16, accumulate=3 job
into JOB_DIR: the kill-and-resume tests run it in a subprocess that ``POLYTASK_KILL_AT`` kills mid-run.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from polytask.config import Config, MethodConfig
from polytask.engine import step as step_mod
from polytask.engine.data import TensorBatches
from polytask.engine.loop import task_losses, train_job
from polytask.engine.optim import optimizer
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import accumulated_step, build_method, train_step
from polytask.errors import ConfigError
from polytask.flows.jobs import Job, spec_from_config
from polytask.models import build_model
from polytask.tasks import Task, TaskData, build_suite
from polytask.weighting import StepContext

TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]
SUITE = {"d": 6, "groups": [2], "unrelated": 1, "conflicting_pairs": 0, "n_train": 96, "n_val": 32, "n_test": 32}


def setup(seed=0):
    torch.manual_seed(seed)
    model = build_model(TASKS, (6,), "mlp", {"hidden": [8, 5]})
    x = torch.randn(24, 6)
    y = {"a": torch.randint(0, 3, (24,)).float(), "b": torch.randn(24), "c": torch.randint(0, 2, (24,)).float()}
    y["c"][[0, 1, 2, 3, 9, 20]] = float("nan")  # uneven labels per micro-batch: the effective mean must weigh them
    return model, [TaskData(x, y)]


def grads(method, n_micro, precision="fp32"):
    """Gradients of one step over 24 rows in ``n_micro`` micro-batches (SGD with lr 0 leaves the weights alone)."""
    model, src = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rows = torch.arange(24).chunk(n_micro)
    losses, _, _ = accumulated_step(model, method, method.init(), [(src, [r]) for r in rows], TASKS, opt,
                                    StepContext(0, 0, generator=torch.Generator().manual_seed(0)), task_losses,
                                    precision=precision)
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


CASES = [("gls", "params"), ("famo", "params"), ("upgrad", "params"), ("upgrad", "representation"),
         ("mgda", "representation"), ("mean", "params"), ("graddrop", "representation")]


@pytest.mark.parametrize("name,mode", CASES)
def test_accumulated_update_equals_the_full_batch_update(name, mode):
    method = build_method(MethodConfig(name=name, grad_mode=mode), [t.name for t in TASKS])
    want_losses, want = grads(method, 1)
    for n in (2, 3):
        got_losses, got = grads(method, n)
        torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-6)
        for p in want:
            torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-6, msg=f"{name}/{mode} n={n} {p}")


@pytest.mark.parametrize("name,mode", [("sum", "representation"), ("sum", "params"), ("equal", "params")])
def test_recomputed_forwards_draw_the_same_dropout_masks(name, mode):
    """With dropout, the accumulated step's gradient is that of Σ_k L_k over the micro-batches as first drawn:
    the forwards it recomputes (weightings' second pass, the encoder in representation mode) reuse the RNG."""
    method = build_method(MethodConfig(name=name, grad_mode=mode), [t.name for t in TASKS])
    _, src = setup()
    micro = [(src, [r]) for r in torch.arange(24).chunk(3)]
    frac = step_mod.task_fractions(micro, TASKS).float()

    def model_with_dropout():
        torch.manual_seed(1)
        return build_model(TASKS, (6,), "mlp", {"hidden": [8, 5], "dropout": 0.5})

    ref = model_with_dropout()
    torch.manual_seed(7)
    sum((task_losses(ref, s, r, TASKS) * frac[m]).sum() for m, (s, r) in enumerate(micro)).backward()
    model = model_with_dropout()
    torch.manual_seed(7)
    accumulated_step(model, method, method.init(), micro, TASKS, torch.optim.SGD(model.parameters(), 0.0),
                     StepContext(0, 0), task_losses)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_accumulating_does_not_aggregate_each_micro_batch():
    """The property the equality rests on: the aggregator is called once, on the effective batch's Jacobian."""
    method = build_method(MethodConfig(name="upgrad"), [t.name for t in TASKS])
    calls = []
    real = method.impl.update
    method.impl = method.impl._replace(update=lambda s, g, c: calls.append(g.shape) or real(s, g, c))
    grads(method, 3)
    assert len(calls) == 1


def test_bf16_keeps_per_task_gradients_float32_and_the_gramian_float64(monkeypatch):
    seen = []
    real = step_mod.gramian

    def spy(blocks):
        seen.extend(b.dtype for b in blocks)
        g = real(blocks)
        seen.append(g.dtype)
        return g

    monkeypatch.setattr(step_mod, "gramian", spy)
    for mode in ("params", "representation"):
        method = build_method(MethodConfig(name="upgrad", grad_mode=mode), [t.name for t in TASKS])
        for n in (1, 2):
            losses, got = grads(method, n, "bf16")
            _, want = grads(method, n, "fp32")
            assert losses.dtype == torch.float32
            assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())
            flat = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
            assert torch.cosine_similarity(flat(got), flat(want), dim=0) > 0.98
            assert not torch.equal(flat(got), flat(want))  # bf16 did run
    assert seen and set(seen) == {torch.float32, torch.float64} and seen[-1] == torch.float64


def test_bf16_autocasts_the_forward():
    model, src = setup()
    dtypes = []
    model.encoder.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    method = build_method(MethodConfig(name="equal"), [t.name for t in TASKS])
    train_step(model, method, method.init(), src, [torch.arange(24)], TASKS, torch.optim.SGD(model.parameters(), 0.0),
               StepContext(0, 0), task_losses, precision="bf16")
    assert dtypes == [torch.bfloat16]


def spec(job_dir, epochs=2, every=1, method="upgrad", mode="representation", accumulate=3, precision="bf16"):
    """A small job: a model with dropout (the recomputed forwards must draw the same masks), 6 batches of 16 rows
    per epoch, 2 optimiser steps of 3 micro-batches each; checkpoints after steps 1 (mid-epoch), 2 (epoch end),
    3 (mid-epoch) and 4."""
    suite = build_suite("synthetic", SUITE, seed=0)
    tasks = list(suite.tasks)
    return TrainSpec(
        name="acc", tasks=tasks,
        model=lambda: build_model(tasks, suite.input_shape, "mlp", {"hidden": [16], "dropout": 0.2}),
        optimizer=optimizer("adam", {"lr": 0.01}),
        method=build_method(MethodConfig(name=method, grad_mode=mode), suite.task_names),
        data=TensorBatches(suite.splits, batch_size=16), epochs=epochs,
        checkpoint=CheckpointPolicy(Path(job_dir), every), seed=3, precision=precision, accumulate=accumulate)


@pytest.mark.parametrize("kill", ["micro:8", "write:last.safetensors:3"])
def test_killed_job_resumes_bit_identical(tmp_path, kill):
    """micro:8 is the 2nd micro-batch of the 3rd optimiser step (after the epoch-end checkpoint at step 2): the
    resumed job redoes that step from its first micro-batch. The other kill hits the mid-epoch checkpoint write of
    step 3 after its temporary file is complete, before the rename."""
    want = train_job(spec(tmp_path / "straight"))
    assert want["steps"] == 4
    env = {**os.environ, "POLYTASK_KILL_AT": kill}
    killed = subprocess.run([sys.executable, __file__, str(tmp_path / "killed")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "killed" / "last.safetensors").exists()
    got = train_job(spec(tmp_path / "killed"))
    for name in ("last.safetensors", "best.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert got["history"] == want["history"] and got["test"] == want["test"]


def test_config_resolves_precision_and_accumulation(tmp_path):
    suite = build_suite("synthetic", SUITE, seed=0)
    cfg = Config.model_validate({"train": {"precision": "bf16", "accumulate": 4, "batch_size": 8}})
    job = Job("upgrad", tuple(suite.task_names), MethodConfig(name="upgrad"), "joint")
    s = spec_from_config(job, suite, cfg, tmp_path)
    assert (s.precision, s.accumulate) == ("bf16", 4)
    with pytest.raises(Exception, match="precision"):
        Config.model_validate({"train": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="sam_rho"):
        replace(spec(tmp_path, method="mean", mode="params"),
                method=build_method(MethodConfig(name="mean", sam_rho=0.05), suite.task_names))
    with pytest.raises(ConfigError, match=r"train\.accumulate"):
        spec(tmp_path, accumulate=0)


if __name__ == "__main__":
    train_job(spec(sys.argv[1]))
