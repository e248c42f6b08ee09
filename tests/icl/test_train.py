"""In-context training on polytask's engine: batches are a pure function of (seed, epoch, step), the curricula,
a tiny model whose loss falls, and an exact resume after SIGKILL (a real subprocess)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from polytask.config import MethodConfig
from polytask.engine.loop import evaluate, train_job
from polytask.engine.optim import optimizer
from polytask.engine.state import seed_everything
from polytask.engine.step import build_method
from polytask.errors import ConfigError
from polytask.icl.discrete import Successor
from polytask.icl.functions import DecisionTree, LinearRegression, SparseLinearRegression
from polytask.icl.train import IclJob, PromptBatches, Schedule, icl_spec

torch.set_num_threads(1)


def job(tmp_path, names, method="equal", **kw):
    base = dict(epochs=2, steps=10, batch_size=16, points=Schedule(6, 6), n_embd=32, n_layer=2, n_head=2,
                eval_prompts=32)
    base.update(kw)
    return IclJob("icl", build_method(MethodConfig(name=method), names), optimizer("adam", {"lr": 1e-3}),
                  checkpoint=tmp_path / "job", **base)


def test_schedule_follows_gargs_curriculum():
    s = Schedule(start=11, end=41, inc=2, interval=2000)
    assert [s.at(t) for t in (0, 1999, 2000, 4000, 10**6)] == [11, 11, 13, 15, 41]
    assert Schedule(3, 9).at(0) == 9  # no interval: always the full size


def test_batches_are_a_pure_function_of_seed_epoch_and_step():
    fams = [LinearRegression(dim=4), SparseLinearRegression(dim=4, sparsity=2)]
    src = PromptBatches(fams, 8, 5, Schedule(4, 10, 2, 3), Schedule(2, 4, 1, 3), dim=4)
    a, b = src.epoch(0, 1)[2], src.epoch(0, 1)[2]
    for x, y in zip(a.sources, b.sources, strict=True):
        assert torch.equal(x.x, y.x) and all(torch.equal(x.y[k], y.y[k]) for k in x.y)
    assert not torch.equal(src.epoch(0, 1)[3].sources[0].x, a.sources[0].x)
    assert not torch.equal(src.epoch(1, 1)[2].sources[0].x, a.sources[0].x)
    # global step 7: 4 + 2 * (7 // 3) = 8 points, 2 + 7 // 3 = 4 active coordinates; the last column holds y
    assert a.sources[0].x.shape == (8, 8, 5)
    first = src.epoch(0, 0)[0].sources[0].x  # step 0: 4 points, 2 active coordinates
    assert first.shape == (8, 4, 5) and not first[..., 2:4].any() and first[..., :2].any()


def test_task_curriculum_masks_families_that_have_not_entered():
    src = PromptBatches([LinearRegression(dim=3), SparseLinearRegression(dim=3, sparsity=1)], 8, 4, Schedule(5, 5),
                        enter_every=6)
    early, late = src.epoch(0, 1)[1], src.epoch(0, 1)[2]  # global steps 5 and 6
    assert len(early.sources[1]) == 1 and torch.isnan(early.sources[1].y["sparse_linear_regression"]).all()
    assert len(late.sources[1]) == 8 and not torch.isnan(late.sources[1].y["sparse_linear_regression"]).any()


@pytest.mark.parametrize("method", ["equal", "upgrad"])
def test_a_tiny_model_trains_end_to_end_and_the_loss_falls(tmp_path, method):
    """Two families, a joint method over their losses: after 40 steps each family's validation loss is below the
    untrained model's (built at the job's seed) by 15 %; the engine wrote its checkpoints."""
    fams = [DecisionTree(dim=2, depth=1), LinearRegression(dim=1)]
    spec = icl_spec(fams, job(tmp_path, [f.name for f in fams], method, steps=20, batch_size=32,
                              dims=Schedule(1, 2, 1, 10)))
    seed_everything(spec.seed)
    before = evaluate(spec.model(), spec.data.split("val"), spec.tasks)
    result = train_job(spec)
    assert result["steps"] == 40 and result["best_epoch"] == 2
    after = {h["task"]: h["loss"] for h in result["history"] if h["split"] == "val" and h["epoch"] == 2}
    for name in ("decision_tree", "linear_regression"):
        assert after[name] < 0.85 * before[name]["loss"], (name, before[name], after[name])
    assert (tmp_path / "job" / "last.safetensors").is_file() and (tmp_path / "job" / "best.safetensors").is_file()


def test_a_token_task_trains_and_scores_accuracy(tmp_path):
    fam = Successor(alphabet=5)
    spec = icl_spec([fam], job(tmp_path, [fam.name], epochs=2, steps=25, points=Schedule(4, 4)))
    result = train_job(spec)
    val = [h for h in result["history"] if h["split"] == "val"]
    assert 0.0 <= val[-1]["accuracy"] <= 1.0
    assert val[-1]["loss"] < val[0]["loss"] or val[-1]["accuracy"] > val[0]["accuracy"]


def test_bad_families_are_named(tmp_path):
    with pytest.raises(ConfigError, match="linear_regression"):
        icl_spec([LinearRegression(dim=3), LinearRegression(dim=4)], job(tmp_path, ["a", "b"]))
    with pytest.raises(ConfigError, match="separate runs"):
        icl_spec([LinearRegression(dim=3), Successor(alphabet=10)], job(tmp_path, ["linear_regression", "successor"])
                 ).model()


SCRIPT = textwrap.dedent("""
    import sys, torch
    from polytask.config import MethodConfig
    from polytask.engine.loop import train_job
    from polytask.engine.optim import optimizer
    from polytask.engine.step import build_method
    from polytask.icl.functions import LinearRegression, NoisyLinearRegression
    from polytask.icl.train import IclJob, Schedule, icl_spec
    torch.set_num_threads(1)
    fams = [LinearRegression(dim=3), NoisyLinearRegression(dim=3, noise_std=0.1)]
    job = IclJob("icl", build_method(MethodConfig(name="famo"), [f.name for f in fams]),
                 optimizer("adam", {"lr": 1e-3}), epochs=2, steps=8, batch_size=8, points=Schedule(3, 7, 2, 5),
                 dims=Schedule(2, 3, 1, 5), checkpoint=sys.argv[1], n_embd=32, n_layer=2, n_head=2, eval_prompts=16,
                 checkpoint_every=3, seed=3)
    train_job(icl_spec(fams, job))
""")


def _run(out, kill=None):
    env = {**os.environ, **({"POLYTASK_KILL_AT": kill} if kill else {})}
    env.pop("POLYTASK_KILL_AT", None) if kill is None else None
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_sigkill_and_resume_ends_with_the_same_weights_bytes(tmp_path):
    """Killed after step 11 (mid second epoch, after a step checkpoint at 9): the resumed run's checkpoints equal,
    byte for byte, those of a run that never stopped (a stateful method, FAMO, and the curricula included)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(whole).returncode == 0
    proc = _run(killed, "step:11")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "last.safetensors").is_file() and not (killed / "best.safetensors").exists()
    assert load_file(killed / "last.safetensors") != {}  # a real checkpoint was there to resume from
    done = _run(killed)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("last.safetensors", "best.safetensors"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
