"""Kill a real `polytask run` subprocess with SIGKILL at several points, resume it, and compare
bit for bit with a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import tiny_config_yaml

CLI = [sys.executable, "-m", "polytask.cli"]
# stateful methods too: their state (Adam moments, logits, EMA targets, validation history) must resume exactly
EXTRA = """baselines: {cache: false}
methods: [equal, uw, famo, {name: coba, params: {warmup_steps: 5, window: 4}}, gradvac, {name: nashmtl, label: nash}]
"""


def polytask(*args, env=None, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def weights(run_dir: Path):
    out = {}
    for f in sorted(run_dir.glob("jobs/*/*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{f.name}/{k}"] = v
    return out


def comparable(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in summary["results"].values():
        r.pop("wall_time_s")
    for k in ("wall_time_s", "started", "run_id"):
        summary.pop(k)
    return summary, (run_dir / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = out / "c.yaml"
    cfg.write_text(tiny_config_yaml(out, "ref", EXTRA))
    r = polytask("run", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr
    return out / "ref"


def kill_and_resume(tmp_path, kill_at=None, after_s=None):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "run", EXTRA))
    env = dict(os.environ)
    if kill_at:
        env["POLYTASK_KILL_AT"] = kill_at
        first = polytask("run", str(cfg), "--quiet", env=env)
        assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr)
    else:
        proc = subprocess.Popen([*CLI, "run", str(cfg), "--quiet"], env=env)
        time.sleep(after_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_dir = tmp_path / "run"
    assert not (run_dir / "summary.json").exists() or after_s
    env.pop("POLYTASK_KILL_AT", None)
    again = polytask("run", "--resume", str(run_dir), "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    return run_dir


@pytest.mark.parametrize("kill_at", [
    "step:6",                      # mid-epoch in the first single-task job, between checkpoints
    "write:last.safetensors:5",    # inside a checkpoint write: temp file complete, not yet renamed
    "step:195",                    # mid-epoch in CoBa's job (its validation history must resume)
    "step:255",                    # in Nash-MTL's job (previous solution kept in its state)
    "write:summary.json:1",        # after all training, while writing the summary
])
def test_sigkill_and_resume_is_bit_identical(reference, tmp_path, kill_at):
    run_dir = kill_and_resume(tmp_path, kill_at=kill_at)
    ref_w, got_w = weights(reference), weights(run_dir)
    assert ref_w.keys() == got_w.keys() and len(ref_w) > 0
    for k in ref_w:
        assert (ref_w[k] == got_w[k]).all(), k
    assert comparable(run_dir) == comparable(reference)


def test_external_sigkill_at_a_random_moment(reference, tmp_path):
    run_dir = kill_and_resume(tmp_path, after_s=4.0)
    assert comparable(run_dir) == comparable(reference)
    ref_w, got_w = weights(reference), weights(run_dir)
    assert all((ref_w[k] == got_w[k]).all() for k in ref_w)
