"""Hooks on the engine: when they are called, what they add to the step, and exact kill-and-resume of their state.

Run as a script (``python test_hooks.py JOB_DIR``), this module trains the stateful-hook job into JOB_DIR: the
kill-and-resume test runs it in a subprocess that ``POLYTASK_KILL_AT`` kills mid-run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polytask.config import MethodConfig
from polytask.engine.data import Batch, TensorBatches
from polytask.engine.hooks import Hook
from polytask.engine.loop import train_job
from polytask.engine.optim import optimizer
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import build_method
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.tasks import build_suite

SUITE = {"d": 6, "groups": [2], "unrelated": 1, "conflicting_pairs": 0, "n_train": 96, "n_val": 32, "n_test": 32}


def spec(job_dir, hooks=(), method=None, opt=None, epochs=3, every=4, seed=5):
    """A small job built by hand (no config): a factory model with dropout, so the RNG states matter too."""
    suite = build_suite("synthetic", SUITE, seed=0)
    tasks = list(suite.tasks)
    return TrainSpec(
        name="hooked", tasks=tasks,
        model=lambda: build_model(tasks, suite.input_shape, "mlp", {"hidden": [16], "dropout": 0.2}),
        optimizer=opt or optimizer("adam", {"lr": 0.01}),
        method=build_method(method or MethodConfig(name="uw"), suite.task_names),
        data=TensorBatches(suite.splits, batch_size=16), epochs=epochs,
        checkpoint=CheckpointPolicy(Path(job_dir), every), seed=seed, hooks=list(hooks))


def _shared(model):
    return torch.cat([p.flatten() for p in model.shared_parameters()])


class Anchor(Hook):
    """A stateful hook: an exponential moving average of the shared parameters, updated every step, and an extra
    loss pulling the parameters towards it; its state is checkpointed under ``anchor``."""

    name = "anchor"

    def init(self, run):
        self.ema, self.steps = None, 0

    def on_step(self, run, step):
        now = _shared(run.model).detach()
        self.ema = now.clone() if self.ema is None else 0.8 * self.ema + 0.2 * now
        self.steps += 1

    def extra_loss(self, run, step):
        return 5.0 * ((_shared(run.model) - self.ema) ** 2).sum()

    def state_dict(self):
        return {"ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state):
        self.ema, self.steps = state["ema"], state["steps"]


class ForgetfulAnchor(Anchor):
    """The same hook, but it forgets its state on resume (what a hook outside the checkpoint would do)."""

    def load_state_dict(self, state):
        pass


def test_stateful_hook_resumes_bit_identical_after_a_kill(tmp_path):
    straight = Anchor()
    want = train_job(spec(tmp_path / "straight", [straight]))
    assert straight.steps == want["steps"] == 18

    env = {**os.environ, "POLYTASK_KILL_AT": "step:10"}  # checkpoints at steps 4, 6, 8: killed 2 steps after one
    killed = subprocess.run([sys.executable, __file__, str(tmp_path / "killed")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    shutil.copytree(tmp_path / "killed", tmp_path / "forgetful")
    resumed = Anchor()
    got = train_job(spec(tmp_path / "killed", [resumed]))
    assert resumed.steps == 18
    for name in ("last.safetensors", "best.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert got["history"] == want["history"] and got["test"] == want["test"]

    # the hook's state is what makes it exact: a hook that forgets it ends elsewhere
    train_job(spec(tmp_path / "forgetful", [ForgetfulAnchor()]))
    assert (tmp_path / "forgetful" / "last.safetensors").read_bytes() != \
        (tmp_path / "straight" / "last.safetensors").read_bytes()


class Recorder(Hook):
    """Records the calls it gets; keeps no state."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def init(self, run):
        self.calls.append(("init", run.name, len(run.tasks)))

    def on_step(self, run, step):
        assert run.model.training
        self.calls.append(("step", step.epoch, step.step, step.global_step, len(step.batch.rows[0])))

    def on_epoch(self, run, epoch):
        validated = {r["epoch"] for r in run.state.history if r["split"] == "val"}
        self.calls.append(("epoch", epoch, max(validated), run.state.position.global_step))


def test_hooks_are_called_in_order_and_stateless_ones_leave_the_checkpoint_alone(tmp_path):
    rec = Recorder()
    train_job(spec(tmp_path / "a", [rec], epochs=2, every=0))
    steps = [("step", e, s, 6 * e + s, 16) for e in range(2) for s in range(6)]
    assert rec.calls == [("init", "hooked", 3), *steps[:6], ("epoch", 1, 1, 6), *steps[6:], ("epoch", 2, 2, 12)]
    train_job(spec(tmp_path / "b", [], epochs=2, every=0))
    assert (tmp_path / "a" / "last.safetensors").read_bytes() == (tmp_path / "b" / "last.safetensors").read_bytes()


class Tilt(Hook):
    """Adds c * sum(shared parameters): the update moves every shared parameter by -lr * c more."""

    name = "tilt"

    def extra_loss(self, run, step):
        return 0.25 * _shared(run.model).sum()


@pytest.mark.parametrize("method", [
    MethodConfig(name="equal"), MethodConfig(name="mean"), MethodConfig(name="upgrad"),
    MethodConfig(name="upgrad", grad_mode="representation")],
    ids=["weighting", "mean", "upgrad-params", "upgrad-representation"])
def test_extra_loss_gradient_is_added_to_the_methods_gradient(tmp_path, method):
    """One plain SGD step from the same weights, with and without the hook: every shared parameter differs by
    exactly -lr * c, whichever way the method set the task gradients."""
    moved = {}
    for name, hooks in (("plain", []), ("tilted", [Tilt()])):
        s = spec(tmp_path / name, hooks, method=method, opt=optimizer("sgd", {"lr": 0.1, "momentum": 0.0}), epochs=1)
        torch.manual_seed(0)
        model = s.model()
        one_batch = TensorBatches({k: [d.take(torch.arange(16))] for k, (d,) in s.data.splits.items()}, 16)
        train_job(TrainSpec(**{**vars(s), "model": model, "data": one_batch}))  # one step, one epoch
        moved[name] = _shared(model).detach()
    torch.testing.assert_close(moved["tilted"] - moved["plain"], torch.full_like(moved["plain"], -0.1 * 0.25),
                               rtol=0, atol=1e-6)


class Swap(Hook):
    """Trains every step on other rows than its batch (the first half of the rows, then again the first row)."""

    name = "swap"

    def train_batch(self, run, step):
        (src,), (rows,) = step.batch.sources, step.batch.rows
        self.seen = rows.clone()
        return Batch([src], [torch.cat([rows[: len(rows) // 2], rows[:1]])])


def test_a_hook_that_replaces_the_batch_trains_the_step_on_its_rows(tmp_path):
    """One SGD step with the hook equals one step without it on the rows the hook gave (a batch of 9 rows, one of
    them twice), and the hook saw the step's own batch (all 16 rows)."""
    out = {}
    hooks_seen = None  # the rows the hook saw, set by the first ("swapped") run
    for name, hooks in (("swapped", [Swap()]), ("direct", [])):
        s = spec(tmp_path / name, hooks, method=MethodConfig(name="equal"),
                 opt=optimizer("sgd", {"lr": 0.1, "momentum": 0.0}), epochs=1)
        torch.manual_seed(0)
        model = build_model(s.tasks, (6,), "mlp", {"hidden": [16]})  # no dropout: the rows' order cannot matter
        train = s.data.splits["train"][0].take(torch.arange(16))
        if name == "direct":  # the rows the hook picks from this one batch of 16, in its order
            assert hooks_seen is not None
            train = train.take(torch.cat([hooks_seen[: 8], hooks_seen[:1]]))
        one_batch = TensorBatches({**s.data.splits, "train": [train]}, 16)
        train_job(TrainSpec(**{**vars(s), "model": model, "data": one_batch}))
        if name == "swapped":
            hooks_seen = hooks[0].seen
            assert sorted(hooks_seen.tolist()) == list(range(16))
        out[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(out["swapped"], out["direct"], rtol=0, atol=1e-6)


def test_hook_names_must_be_unique(tmp_path):
    with pytest.raises(ConfigError, match="two hooks are named 'anchor'"):
        train_job(spec(tmp_path, [Anchor(), Anchor()]))


if __name__ == "__main__":
    train_job(spec(sys.argv[1], [Anchor()]))
