"""Kill a real `polytask run` subprocess with SIGKILL at several points, resume it, and compare
bit for bit with a run that was never interrupted."""

import json
import os
import re
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


def file_bytes(run_dir: Path):
    """Every safetensors file of the run's jobs, as bytes (identical runs write identical files)."""
    return {f.relative_to(run_dir).as_posix(): f.read_bytes() for f in sorted(run_dir.glob("jobs/*/*.safetensors"))}


def temporaries(run_dir: Path):
    return sorted(p.name for p in run_dir.rglob(".*.tmp-*"))


def wait_for(predicate, proc, timeout=300):
    """Poll until ``predicate()`` holds (the run has demonstrably reached a point), never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.02)


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


def kill_and_resume(tmp_path, kill_at=None):
    """Kill a run at ``kill_at`` (a fault point), or, without one, from outside once it has written its
    first checkpoint; then resume it to the end."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "run", EXTRA))
    env = dict(os.environ)
    run_dir = tmp_path / "run"
    if kill_at:
        env["POLYTASK_KILL_AT"] = kill_at
        first = polytask("run", str(cfg), "--quiet", env=env)
        assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr)
        assert not (run_dir / "summary.json").exists()
    else:
        proc = subprocess.Popen([*CLI, "run", str(cfg), "--quiet"], env=env)
        try:
            wait_for(lambda: any(run_dir.glob("jobs/*/last.safetensors")), proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
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
    # byte for byte (checksums can compare runs), and the killed writer's temporary is gone
    assert file_bytes(run_dir) == file_bytes(reference)
    assert temporaries(run_dir) == []


def test_external_sigkill_at_a_random_moment(reference, tmp_path):
    run_dir = kill_and_resume(tmp_path)
    assert comparable(run_dir) == comparable(reference)
    assert file_bytes(run_dir) == file_bytes(reference)


def test_killed_before_data_loads_is_resumable_and_restartable(tmp_path):
    """The run directory and its config exist from the start: a run killed before it read any data can be
    resumed, and, as it never trained, a plain run with a changed config starts in it."""
    from polytask.engine.progress import Reporter
    from polytask.flows.run import run
    from polytask.flows.runner import close_run, open_run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "run", "methods: [equal]"))
    first = polytask("run", str(cfg), "--quiet", env=dict(os.environ, POLYTASK_KILL_AT="start:1"))
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = tmp_path / "run"
    resumed_dir, resumed, _ = open_run(None, run_dir)
    close_run(resumed_dir)
    assert resumed.train.epochs == 3 and resumed.methods[0].name == "equal"
    from polytask.config import load_config

    changed = load_config(cfg, ["train.epochs=1"])
    _, summary = run(changed, reporter=Reporter(quiet=True), report=False)
    assert "epochs: 1" in (run_dir / "config.yaml").read_text()
    assert {r["best_epoch"] for r in summary["results"].values() if r["kind"] == "joint"} == {1}


def test_full_disk_names_the_file_and_resume_completes(reference, tmp_path):
    """A write refused by the kernel (here: a file-size limit, EFBIG, as a full disk gives ENOSPC) ends in
    one line naming the file, leaves no temporaries, and the resumed run finishes identical to the reference."""
    import resource

    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "run", "baselines: {cache: false}\nmethods: [equal]"))

    def small_files():  # CPython ignores SIGXFSZ, so an oversized write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    first = subprocess.run([*CLI, "run", str(cfg), "--quiet"], capture_output=True, text=True, timeout=300,
                           preexec_fn=small_files)
    run_dir = tmp_path / "run"
    assert first.returncode == 2, first.stderr
    assert re.fullmatch(rf"error: cannot write {re.escape(str(run_dir))}/jobs/stl__g0_t0/last\.safetensors: "
                        r"File too large \[errno 27\]; free space there and resume\n", first.stderr), first.stderr
    assert temporaries(run_dir) == []
    from polytask.engine.progress import Reporter
    from polytask.flows.run import run

    run(resume=run_dir, reporter=Reporter(quiet=True), report=False)
    got, ref = file_bytes(run_dir), file_bytes(reference)
    assert len(got) == 8 and all(ref[k] == v for k, v in got.items())  # 4 jobs (best, last) as in the reference
