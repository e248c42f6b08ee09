"""A run on a streamed Parquet table (``stream: true``) killed mid-epoch resumes bit-identically, and predicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import polytask
from polytask.config import load_config
from polytask.engine.progress import Reporter
from polytask.flows.predict import predict_file
from polytask.flows.run import run
from polytask.tasks.registry import build_suite

CLI = [sys.executable, "-m", "polytask.cli"]
FEATURES = ["f0", "f1", "f2", "f3"]


def polytask_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * [1, 2, 3, 4] + [0, 10, -5, 100]
    f = pd.DataFrame({c: x[:, i] for i, c in enumerate(FEATURES)})
    f["label"] = np.where(x[:, 0] > 0.3, "yes", np.where(x[:, 1] < 10, "no", "maybe"))
    f["price"] = 6000 + 2000 * np.tanh(x[:, 2] / 3)
    return f


def config(root: Path, name: str) -> Path:
    """Two methods (CoBa watches validation batches: its history must resume too), two epochs, checkpoints every
    4 steps; 600 rows in row groups of 64, shuffled in windows of at least 200 rows."""
    path = root / f"{name}.yaml"
    path.write_text(f"""
seed: 3
suite:
  name: table
  params: {{path: {root / 'data.parquet'}, targets: [label, price], stream: true, shuffle_rows: 200}}
model: {{backbone: mlp, backbone_params: {{hidden: [32, 16], dropout: 0.1}}}}
train: {{epochs: 2, batch_size: 32, checkpoint_every: 4, checkpoint_interval_s: 0, optimizer: {{name: adam, lr: 0.01}}}}
methods: [equal, {{name: coba, params: {{warmup_steps: 5, window: 4}}}}]
baselines: {{single_task: false, cache: false}}
output: {{dir: {root}, name: {name}}}
""")
    return path


def outputs(run_dir: Path) -> tuple[dict[str, bytes], dict, str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in summary["results"].values():
        r.pop("wall_time_s")
    for k in ("wall_time_s", "started", "run_id"):
        summary.pop(k)
    files = {f.relative_to(run_dir).as_posix(): f.read_bytes() for f in sorted(run_dir.glob("jobs/*/*.safetensors"))}
    return files, summary, (run_dir / "metrics.jsonl").read_text()


def run_here(cfg: Path | None = None, resume: Path | None = None) -> Path:
    """``polytask run`` (or ``--resume``) in this process (the CLI's flow; a subprocess would add its start-up)."""
    run_dir, _ = run(None if cfg is None else load_config(cfg), resume, Reporter(quiet=True), report=False)
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    pq.write_table(pa.Table.from_pandas(frame(600, 0), preserve_index=False), root / "data.parquet",
                   row_group_size=64)
    return run_here(config(root, "ref"))


def test_a_killed_streamed_run_resumes_bit_identically(reference: Path) -> None:
    """Killed at step 47 of the run: CoBa's job (the second; 12 steps an epoch), in its second epoch, 3 steps after
    its checkpoint at epoch step 8, so the resumed run seeks into the epoch's second shuffling window, and CoBa's
    validation-loss history (drawn from the validation pool) resumes too."""
    root = reference.parent
    cfg = config(root, "killed")
    env = dict(os.environ, POLYTASK_KILL_AT="step:47")
    first = polytask_cli("run", str(cfg), "--quiet", env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = root / cfg.stem
    assert not (run_dir / "summary.json").exists() and (run_dir / "jobs" / "coba" / "last.safetensors").exists()
    run_here(resume=run_dir)
    got, ref = outputs(run_dir), outputs(reference)
    assert len(got[0]) == 4 and got[0] == ref[0]  # best and last weights of both jobs, byte for byte
    assert got[1:] == ref[1:]


def test_a_streamed_run_predicts_with_its_fitted_preprocessing(reference: Path, tmp_path: Path) -> None:
    """preprocessing.json holds the streamed fit (as the in-memory suite of the same file fits it), and predict reads
    new rows with it."""
    saved = json.loads((reference / "preprocessing.json").read_text())
    memory = build_suite("table", {"path": str(reference.parent / "data.parquet"), "targets": ["label", "price"]},
                         3).preprocessing()
    assert saved["features"] == memory["features"] == FEATURES
    assert saved["tasks"]["label"]["classes"] == memory["tasks"]["label"]["classes"] == ["maybe", "no", "yes"]
    for got, want in ((saved["input_standardize"], memory["input_standardize"]),
                      (saved["tasks"]["price"]["standardize"], memory["tasks"]["price"]["standardize"])):
        np.testing.assert_allclose(got["mean"] + got["std"], want["mean"] + want["std"], rtol=1e-12)

    new = frame(50, 1)
    new[FEATURES].to_csv(tmp_path / "new.csv", index=False)
    _, predictor, n = predict_file(reference, None, tmp_path / "new.csv", tmp_path / "p.csv")  # what the CLI calls
    assert n == 50 and predictor.job.id == polytask.load(reference).job.id
    got = pd.read_csv(tmp_path / "p.csv")
    assert set(got["label"]) <= {"maybe", "no", "yes"} and 4000 < got["price"].mean() < 8000
    pd.testing.assert_frame_equal(got, polytask.load(reference).predict(new[FEATURES]), check_dtype=False, rtol=1e-12)
