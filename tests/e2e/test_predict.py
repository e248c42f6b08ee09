"""`polytask predict` and `polytask.load`: a trained run answers new rows in the user's labels and units."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import polytask
from polytask.cli import app
from polytask.errors import CheckpointError, DataError
from polytask.models import build_model
from polytask.predict import predict_file
from polytask.tasks import Task

CLI = [sys.executable, "-m", "polytask.cli"]
FEATURES = ["f0", "f1", "f2", "f3"]
LABELS = {"a": {"no", "yes"}, "b": {"blue", "green", "red"}}


def polytask_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def _frame(n: int, seed: int) -> pd.DataFrame:
    """Two string-labelled classification columns and a price of about 6000 ± 2000."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    frame = pd.DataFrame({f: x[:, i] for i, f in enumerate(FEATURES)})
    frame["a"] = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    frame["b"] = np.where(x[:, 2] > 0.4, "red", np.where(x[:, 2] < -0.4, "blue", "green"))
    frame["price"] = 6000 + 2000 * (0.8 * x[:, 3] + 0.6 * x[:, 0])
    return frame


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    _frame(300, 0).to_csv(root / "data.csv", index=False)
    (root / "c.yaml").write_text(f"""
flow: compare
seed: 0
suite: {{name: table, params: {{path: {root / 'data.csv'}, targets: [a, b, price]}}}}
model: {{backbone_params: {{hidden: [16]}}}}
train: {{epochs: 2, batch_size: 32, optimizer: {{lr: 0.01}}}}
methods: [equal]
baselines: {{cache: false}}
output: {{dir: {root}, name: r}}
""")
    r = polytask_cli("run", str(root / "c.yaml"), "--quiet")
    assert r.returncode == 0, r.stderr
    return root / "r"


def _manual_forward(run_dir: Path, new: pd.DataFrame) -> dict[str, np.ndarray]:
    """The saved network of job `equal` applied by hand: standardise with preprocessing.json's numbers,
    forward, then labels by index and prices times std plus mean."""
    pre = json.loads((run_dir / "preprocessing.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    mean, std = (np.array(pre["input_standardize"][k]) for k in ("mean", "std"))
    x = torch.tensor((new[pre["features"]].to_numpy() - mean) / std).float()
    tasks = [Task("a", "classification", 2), Task("b", "classification", 3), Task("price", "regression", 1)]
    model = build_model(tasks, (4,), "mlp", config["model"]["backbone_params"])
    model.load_state_dict(load_file(run_dir / "jobs" / "equal" / "best.safetensors"))
    model.eval()
    with torch.no_grad():
        out = model(x)
    price = pre["tasks"]["price"]["standardize"]
    return {"a": np.array(pre["tasks"]["a"]["classes"])[out["a"].argmax(-1).numpy()],
            "b": np.array(pre["tasks"]["b"]["classes"])[out["b"].argmax(-1).numpy()],
            "b_proba": torch.softmax(out["b"].double(), -1).numpy(),
            "price": out["price"][:, 0].double().numpy() * price["std"][0] + price["mean"][0]}


def test_predict_answers_in_the_training_labels_and_units(run_dir: Path) -> None:
    new = _frame(60, 1)[FEATURES]
    new.to_csv(run_dir.parent / "new.csv", index=False)
    out = run_dir.parent / "predictions.csv"
    r = polytask_cli("predict", str(run_dir), "--input", str(run_dir.parent / "new.csv"), "--out", str(out),
                     "--proba")
    assert r.returncode == 0, r.stderr
    assert "60 rows predicted by job 'equal' (best joint job of summary.json)" in r.stdout
    got = pd.read_csv(out)
    assert list(got.columns) == ["a", "a:proba:no", "a:proba:yes", "b", "b:proba:blue", "b:proba:green",
                                 "b:proba:red", "price"]
    for task, labels in LABELS.items():
        assert set(got[task]) <= labels
        assert np.allclose(got[[c for c in got.columns if c.startswith(f"{task}:proba:")]].sum(axis=1), 1.0)
    train_price = _frame(300, 0)["price"]
    assert abs(got["price"].mean() - train_price.mean()) < 0.5 * train_price.std()  # original units, not ~0
    assert got["price"].std() > 100

    manual = _manual_forward(run_dir, new)
    assert list(got["a"]) == list(manual["a"]) and list(got["b"]) == list(manual["b"])
    np.testing.assert_allclose(got["price"], manual["price"], rtol=1e-12)
    np.testing.assert_allclose(got[["b:proba:blue", "b:proba:green", "b:proba:red"]], manual["b_proba"], rtol=1e-9)

    frame = polytask.load(run_dir, "equal").predict(new, proba=True)
    pd.testing.assert_frame_equal(frame, got, check_dtype=False, rtol=1e-12)


def test_a_named_job_reads_and_writes_parquet(run_dir: Path, tmp_path: Path) -> None:
    new = _frame(20, 2)[FEATURES[::-1]]  # columns in another order
    new.to_parquet(tmp_path / "new.parquet")
    path, predictor, n = predict_file(run_dir, "stl/price", tmp_path / "new.parquet", tmp_path / "p.parquet")
    assert (predictor.job.id, n) == ("stl/price", 20)
    got = pd.read_parquet(path)
    assert list(got.columns) == ["price"]
    np.testing.assert_allclose(got["price"], polytask.load(run_dir, "stl__price").predict(new)["price"], rtol=0)
    assert not np.allclose(got["price"], polytask.load(run_dir).predict(new)["price"])  # another network


def test_bad_columns_are_one_error_naming_them_and_the_file(run_dir: Path, tmp_path: Path) -> None:
    new = _frame(10, 3)
    new[FEATURES[1:]].to_csv(tmp_path / "short.csv", index=False)
    r = CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "short.csv"),
                                 "--out", str(tmp_path / "o.csv")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: table {tmp_path / 'short.csv'}: missing feature column(s) 'f0'")
    assert not (tmp_path / "o.csv").exists()

    predictor = polytask.load(run_dir)
    with pytest.raises(DataError, match=r"extra column\(s\) 'a', 'zz' \('a': target column\(s\) of the run"):
        predictor.predict(new[[*FEATURES, "a"]].assign(zz=1.0))
    bad = new[FEATURES].astype({"f2": object})
    bad.loc[4, "f2"] = "ten"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=rf"table {tmp_path / 'bad.csv'}: feature column 'f2' is not numeric \(row 4"):
        predictor.predict(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"output .*o\.xlsx: unknown file type"):
        predict_file(run_dir, None, tmp_path / "short.csv", tmp_path / "o.xlsx")


def test_the_job_must_be_named_when_the_summary_ranks_none(run_dir: Path, tmp_path: Path) -> None:
    listing = r"finished jobs: equal \(joint: a, b, price\), stl/a \(single_task: a\), stl/b .*stl/price"
    with pytest.raises(CheckpointError, match=rf"run {run_dir} has no finished job 'eqaul' .*; {listing}"):
        polytask.load(run_dir, "eqaul")
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    (copy / "summary.json").unlink()
    with pytest.raises(CheckpointError, match=rf"name the job to predict with \(--job\).*; {listing}"):
        polytask.load(copy)
    assert polytask.load(copy, "equal").job.id == "equal"
    (copy / "jobs" / "equal" / "best.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read .*equal/best\.safetensors"):
        polytask.load(copy, "equal")


def test_a_wrong_run_job_or_file_name_is_answered_before_torch_is_imported(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "new.csv").write_text("f0,f1,f2,f3\n0,0,0,0\n")
    cases = {(str(tmp_path / "nowhere"), "new.csv", "o.csv"): f"{tmp_path / 'nowhere'} is not a run directory",
             (str(run_dir), "new.csv", "o.json"): "unknown file type 'o.json'",
             (str(run_dir), "absent.csv", "o.csv"): f"table {tmp_path / 'absent.csv'} does not exist"}
    for (run, new, out), message in cases.items():
        r = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], "predict", run, "--input",
                            str(tmp_path / new), "--out", str(tmp_path / out)], capture_output=True, text=True,
                           timeout=300)
        errors = [line for line in r.stderr.splitlines() if "import time:" not in line]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr[-2000:]
        assert not any(line.rsplit("|", 1)[-1].strip().split(".")[0] == "torch"
                       for line in r.stderr.splitlines() if "import time:" in line)
