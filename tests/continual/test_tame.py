"""TAME: the loss-shift test on synthetic losses, the experts' routing, the scenarios it refuses, and on split-digits
one expert per experience, an old task going back to its expert, less forgetting than naive, exact resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.continual import Stream, build_strategy, build_stream
from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.tame import Experts, TameParams, first_shift, shift_threshold
from polytask.engine import checkpoint
from polytask.errors import ConfigError
from polytask.flows.continual import continual
from polytask.models import build_model

ROOT = Path(__file__).resolve().parents[2]
LOG10 = math.log(10)  # a fresh expert's first window entry for a 10-class head


def decay(seed, n, floor, tau, noise, start=LOG10):
    """Batch losses of one experience: an exponential decay from ``start`` to ``floor`` over ``tau`` batches, each
    batch off by a relative error uniform in [-noise, noise]."""
    rng = np.random.default_rng(seed)
    base = floor + (start - floor) * np.exp(-np.arange(n) / tau)
    return (base * (1 + noise * rng.uniform(-1, 1, n))).tolist()


# ---------------------------------------------------------------- the shift test


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 50), min_size=1, max_size=40), st.floats(0.5, 5), st.floats(0, 0.1))
def test_threshold_is_the_window_mean_plus_k_stds(window, k, min_std):
    want = np.mean(window) + k * max(np.std(window), min_std)
    assert shift_threshold(window, k, min_std) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert shift_threshold([], k, min_std) == math.inf


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 400), st.floats(0.001, 1.0), st.floats(1, 40), st.floats(0, 1),
       st.sampled_from([(1, 0.05), (3, 0.3)]))
def test_the_test_is_quiet_within_a_stationary_experience(seed, n, floor, tau, fraction, regime):
    """A loss that decays (fast or slowly, to any floor) with relative batch noise never fires: with the paper's
    settings for noise up to 5%; a ``warmup`` of 3 batches keeps a fresh expert's first noisy losses (up to 30%) from
    firing its two-entry window."""
    warmup, noise = regime
    assert first_shift(decay(seed, n, floor, tau, fraction * noise), LOG10, warmup=warmup) is None


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1, 10), st.integers(0, 200), st.floats(0.001, 0.3), st.floats(1, 50),
       st.integers(1, 50), st.sampled_from([(1, 0.05), (3, 0.3)]))
def test_the_test_fires_at_the_first_batch_of_a_real_change(seed, tau, extra, floor, level, after, regime):
    """After an experience has converged (its decay done before the window's reach), a batch whose loss jumps to a
    new task's level (at least 1 and 4x the floor, as a 10-class expert meets unseen classes; 8x under 30 % batch
    noise, where the smoothed loss (weight 0.2 on the new batch) of a smaller jump stays within 3 standard deviations
    of the window for a batch or two) fires the test on that batch, never before."""
    warmup, noise = regime
    n = int(10 * tau) + 35 + extra
    level = max(level, (4 if noise < 0.1 else 8) * floor)
    rng = np.random.default_rng(seed + 1)
    losses = decay(seed, n, floor, tau, noise) + (level * (1 + noise * rng.uniform(-1, 1, after))).tolist()
    assert first_shift(losses, LOG10, warmup=warmup) == n


def test_a_lower_loss_never_fires_and_the_window_forgets():
    """A drop never fires; a jump is judged against the last ``window`` losses only."""
    assert first_shift([1.0] * 50 + [0.1] * 50, LOG10) is None
    noisy_then_flat = [3.0, 0.1] * 20 + [0.1] * 40  # the early spread leaves a 35-batch window
    assert first_shift([*noisy_then_flat, 1.0], LOG10) == len(noisy_then_flat)
    assert first_shift([*noisy_then_flat, 1.0], LOG10, window=100) is None


# ---------------------------------------------------------------- the model


class Pick(torch.nn.Module):
    """A selector stub: row i's logits favour expert ``x[i, 0]`` (an integer in the first input)."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), 4).float()


def test_eval_routes_each_row_to_the_selectors_expert_and_train_uses_the_current_one():
    stream = build_stream("split-digits", {"scenario": "class"}, seed=0)
    torch.manual_seed(0)
    model = build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [8]})
    experts = Experts(model, 4, Pick())
    with torch.no_grad():
        for k, e in enumerate(experts.experts):
            for p in e.parameters():
                p.add_(0.1 * k)
    x = torch.rand(10, 64)
    x[:, 0] = torch.tensor([0, 1, 2, 3, 1, 1, 0, 2, 2, 3], dtype=torch.float32)
    experts.eval()
    assert torch.equal(experts(x)["class"], experts.experts[0](x)["class"])  # the selector knows one expert: 0
    experts.known.fill_(3)  # routes among experts 0..2: expert 3's rows go to the most likely of those
    got = experts(x)["class"]
    for i, j in enumerate([0, 1, 2, 0, 1, 1, 0, 2, 2, 0]):
        assert torch.allclose(got[i], experts.experts[j](x[i:i + 1])["class"][0])
    experts.train()
    experts.current.fill_(2)
    assert torch.equal(experts(x)["class"], experts.experts[2](x)["class"])
    assert [id(p) for p in experts.shared_parameters()] == [id(p) for p in experts.experts[2].encoder.parameters()]
    assert [id(p) for p in experts.task_parameters("class")] == \
        [id(p) for p in experts.experts[2].heads["class"].parameters()]
    keys = {k: v.shape for k, v in experts.state_dict().items()}
    experts.live.fill_(4)
    assert {k: v.shape for k, v in experts.state_dict().items()} == keys  # final shapes from the start


@pytest.mark.parametrize("scenario", ["task", "multitask"])
def test_tame_refuses_streams_that_give_the_task(scenario):
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    if scenario == "multitask":
        stream = Stream("two-tasks", "multitask", stream.experiences[:2])
    strategy = build_strategy("tame", {}, "strategies.0.params")
    with pytest.raises(ConfigError, match=f"does not apply to a {scenario}-incremental stream.*supports: class, "
                       "domain"):
        strategy.check(stream, "tame")


def test_bad_parameters_name_the_key():
    with pytest.raises(ConfigError, match="max_experts"):
        build_strategy("tame", {"max_experts": 0}, "strategies.0.params")
    with pytest.raises(ConfigError, match="windw"):
        build_strategy("tame", {"windw": 10}, "strategies.0.params")
    assert TameParams().window == 35 and TameParams().smoothing == 0.2 and TameParams().sigmas == 3


# ---------------------------------------------------------------- on split-digits


def config(tmp_path, strategies, scenario="class", name="run", epochs=10, batch_size=32):
    return {"seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": scenario}},
            "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
            "train": {"epochs": epochs, "batch_size": batch_size, "checkpoint_every": 3,
                      "checkpoint_interval_s": 0, "threads": 1,
                      "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
            "strategies": strategies, "output": {"dir": str(tmp_path), "name": name}}


def ended(run_dir, experience, label="tame"):
    return checkpoint.load(run_dir / "jobs" / f"{label}-s0" / f"e{experience}" / "end.safetensors")


def test_one_expert_per_experience_and_less_forgetting_than_naive(tmp_path):
    """Class-incremental split-digits, the paper's test settings: the shift is found on the first batch of every new
    experience (one new expert each, none inside an experience), and routing by the selector keeps the earlier
    experiences that naive fine-tuning forgets."""
    run_dir, summary = continual(ContinualConfig.model_validate(config(tmp_path, ["naive", "tame"])))
    saved = ended(run_dir, 4)
    assert int(saved["model"]["live"]) == int(saved["model"]["known"]) == 5
    assert saved["strategy"]["events"] == [[i, 0, 0, i - 1, i, "new"] for i in range(1, 5)]
    tame, naive = (summary["results"][k][0]["metrics"] for k in ("tame", "naive"))
    assert naive["forgetting"] > 0.9 and tame["forgetting"] < 0.2
    assert tame["average_accuracy"] > 0.8 > naive["average_accuracy"] + 0.6


def test_a_task_seen_again_goes_back_to_its_expert(tmp_path):
    """Experiences 0, 1, then 0's data again: the shift into the repeat is answered by the expert that learnt it
    (its loss is below its frozen threshold), not by a new one; the selector then routes both tasks."""
    base = build_stream("split-digits", {"scenario": "class"}, seed=0)
    e0, e1 = base.experiences[:2]
    stream = Stream("again", "class", (e0, e1, type(e0)("e2", e0.suite)))
    run_dir, summary = continual(ContinualConfig.model_validate(config(tmp_path, ["tame"], epochs=8)), stream=stream)
    saved = ended(run_dir, 2)
    assert saved["strategy"]["events"] == [[1, 0, 0, 0, 1, "new"], [2, 0, 0, 1, 0, "fit"]]
    assert int(saved["model"]["live"]) == 2
    acc = summary["results"]["tame"][0]["accuracy"]
    assert min(acc[2]) > 0.9


def test_a_sigkill_after_shifts_resumes_bit_identically(tmp_path):
    """Killed inside experience 2 (after its shift, with the selector trained on two experts at experience 1's end),
    the run resumes to the same weights, buffer, detector state and accuracy matrix as one that never stopped."""
    cfg = config(tmp_path, ["tame"], name="straight", epochs=2)
    straight, _ = continual(ContinualConfig.model_validate(cfg))
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output": {"dir": str(tmp_path), "name": "killed"}}))
    out = subprocess.run([sys.executable, "-m", "polytask.cli", "continual", str(path), "--quiet"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "POLYTASK_KILL_AT": "step:33"})  # step 5 of experience 2 (14 a job)
    assert out.returncode == -9, out.stderr
    killed = tmp_path / "killed"
    # e1's end.safetensors and done.json are written in the background while e2 trains: under load they may not be
    # on disk yet at the kill, which the resume must handle too, so only the kill's place inside e2 is asserted
    assert (killed / "jobs" / "tame-s0" / "e2").is_dir()
    assert not (killed / "jobs" / "tame-s0" / "e2" / "end.safetensors").exists()
    continual(None, resume=killed)
    for d in sorted((straight / "jobs" / "tame-s0").glob("e*")):
        twin = killed / "jobs" / "tame-s0" / d.name
        assert (twin / "end.safetensors").read_bytes() == (d / "end.safetensors").read_bytes(), d
    assert [2, 0, 0, 1, 2, "new"] in ended(straight, 4)["strategy"]["events"]  # the kill fell after e2's shift
    want = json.loads((straight / "summary.json").read_text())["results"]["tame"]
    got = json.loads((killed / "summary.json").read_text())["results"]["tame"]
    assert want[0]["accuracy"] == got[0]["accuracy"] and want[0]["metrics"] == got[0]["metrics"]
