"""Categorical feature columns of the ``table`` suite: codes fitted on the training rows, unknown code 0, the saved
categories at predict time, the ``Embedded`` front in the shared encoder, and a CLI run that trains, predicts and
resumes bit-identically after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import polytask
from polytask.errors import ConfigError, DataError
from polytask.models import build_model
from polytask.models.embedding import Embedded, embedding_width
from polytask.tasks import build_suite
from polytask.tasks.suites.table import category_keys, encode_features
from polytask.tasks.task import SPLITS, Standardizer, categorical_from_json

CLI = [sys.executable, "-m", "polytask.cli"]
COLORS = ["red", "green", "blue", "teal"]


def _frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Two numeric features, a text column ``color`` (one blank cell) and an integer column ``shop``; a label that
    depends on the color and a regression target that depends on the shop."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"f0": rng.normal(size=n), "color": rng.choice(COLORS, n), "shop": rng.integers(0, 5, n),
                          "f1": rng.normal(3, 2, n)})
    frame.loc[5, "color"] = None
    frame["label"] = np.where((frame.color == "red") | (frame.f0 > 1), "hot", "cold")
    frame["price"] = 10 * frame.shop + frame.f1
    return frame


def _suite(path: Path, **params: object):
    return build_suite("table", {"path": str(path), "targets": ["label", "price"], **params}, 0)


def test_text_columns_become_codes_fitted_on_the_training_rows_only(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "a.csv", index=False)
    first = _suite(tmp_path / "a.csv")
    val_row = int(first.splits["val"][0].index[0])  # the split depends on the row count and seed only
    frame.loc[val_row, "color"] = "violet"  # a value no training row has
    frame.to_csv(tmp_path / "t.csv", index=False)
    suite = _suite(tmp_path / "t.csv")
    assert suite.info["features"] == ["f0", "color", "shop", "f1"]
    train_rows = suite.splits["train"][0].index.numpy()
    fitted = sorted(frame.color.iloc[train_rows].dropna().unique())
    assert suite.info["categories"] == {"color": fitted} and "violet" not in fitted
    assert suite.categorical == {1: len(fitted) + 1}  # codes 1..K and the unknown code 0
    # the input scale leaves the codes alone, and the numeric columns are standardised as without the text column
    assert suite.input_scale.mean[1] == 0.0 and suite.input_scale.std[1] == 1.0
    numeric = _suite(tmp_path / "t.csv", features=["f0", "shop", "f1"])
    for split in SPLITS:
        (data,) = suite.splits[split]
        assert torch.equal(data.x[:, [0, 2, 3]], numeric.splits[split][0].x)
        colors = frame.color.iloc[data.index.numpy()].to_numpy()
        want = [fitted.index(c) + 1 if c in fitted else 0 for c in colors]
        assert data.x[:, 1].tolist() == want
    (val,) = suite.splits["val"]
    assert val.x[val.index == val_row, 1].item() == 0  # unseen in training: unknown
    (data,) = [s for split in SPLITS for s in suite.splits[split] if 5 in s.index.tolist()]
    assert data.x[data.index == 5, 1].item() == 0  # a missing cell: unknown
    saved = json.loads(json.dumps(suite.preprocessing()))
    assert categorical_from_json(saved["categorical"]) == suite.categorical
    assert saved["categories"] == {"color": fitted}


def test_named_columns_and_category_names(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    suite = _suite(tmp_path / "t.csv", categorical=["shop", "color"])  # an integer column read as categories too
    assert suite.info["categories"]["shop"] == ["0", "1", "2", "3", "4"] and suite.categorical == {1: 5, 2: 6}
    (train,) = suite.splits["train"]
    assert train.x[:, 2].tolist() == (frame.shop.iloc[train.index.numpy()] + 1).tolist()
    # one name per value: 3 and 3.0 (a column read as floats because of a blank) are one category; text as written
    keys = category_keys(pd.Series([3, 3.0, 2.5, None, " ", "x", True, np.nan], dtype=object))
    assert keys.tolist() == ["3", "3", "2.5", None, None, "x", "True", None]
    # a list names every categorical column: a text column left out is an error, [] reads every feature as a number
    with pytest.raises(DataError, match=r"feature column 'color' is not numeric .*suite\.params\.categorical"):
        _suite(tmp_path / "t.csv", categorical=["shop"])
    with pytest.raises(DataError, match=r"feature column 'color' is not numeric .*suite\.params\.categorical"):
        _suite(tmp_path / "t.csv", categorical=[])


def test_errors_name_the_column_and_the_option(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ConfigError, match=r"categorical column\(s\) \['label'\] are targets"):
        _suite(tmp_path / "t.csv", categorical=["label"])
    with pytest.raises(ConfigError, match=r"categorical column\(s\) \['shop'\] are not among the features"):
        _suite(tmp_path / "t.csv", features=["f0", "color"], categorical=["shop"])
    with pytest.raises(DataError, match=r"categorical column\(s\) \['colour'\] are not feature columns"):
        _suite(tmp_path / "t.csv", categorical=["colour"])
    mixed = frame.astype({"f1": object})
    mixed.loc[7, "f1"] = "oops"  # a numeric column with a stray word stays an error, with the way out
    mixed.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"feature column 'f1' is not numeric \(row 7.*'oops'\); name the column in "
                                        r"suite\.params\.categorical"):
        _suite(tmp_path / "m.csv")
    with pytest.raises(ConfigError, match=r"suite\.params\.categorical: stream: true reads numeric features only"):
        _suite(tmp_path / "t.csv", categorical=["color"], stream=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"feature column 'color' is not numeric .*stream: false"):
        _suite(tmp_path / "t.csv", stream=True, cache_dir=str(tmp_path / "cache"))


def test_new_rows_are_coded_with_the_saved_categories(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    suite = _suite(tmp_path / "t.csv")
    saved = json.loads(json.dumps(suite.preprocessing()))  # as read back from preprocessing.json
    scale = Standardizer.from_json(saved["input_standardize"])
    (train,) = suite.splits["train"]
    rows = frame.iloc[train.index.numpy()][["color", "f1", "shop", "f0"]]  # any column order
    x = encode_features(rows, saved["features"], scale, "rows", categories=saved["categories"])
    assert torch.equal(x, train.x)
    new = pd.DataFrame({"f0": [0.0, 0.0, 0.0], "color": ["green", "mauve", None], "shop": [1, 2, 3],
                        "f1": [3.0, 3.0, 3.0]})
    codes = encode_features(new, saved["features"], scale, "new", categories=saved["categories"])[:, 1]
    assert codes.tolist() == [saved["categories"]["color"].index("green") + 1, 0, 0]


def test_the_embeddings_belong_to_the_shared_encoder() -> None:
    categorical = {1: 4, 3: 40}
    model = build_model([polytask.Task("a", "classification", 2), polytask.Task("b", "regression", 1)], (5,),
                        "mlp", {"hidden": [32]}, categorical=categorical)
    assert isinstance(model.encoder, Embedded)
    widths = [e.embedding_dim for e in model.encoder.embeddings]
    assert widths == [embedding_width(4), embedding_width(40)] == [3, 13]  # min(16, round(1.6 * n ** 0.56))
    assert embedding_width(10_000) == 16
    assert model.encoder.backbone[0].in_features == 3 + 3 + 13
    shared = {id(p) for p in model.shared_parameters()}
    embeddings = [e.weight for e in model.encoder.embeddings]
    assert all(id(w) in shared for w in embeddings)
    assert not shared & {id(p) for t in ("a", "b") for p in model.task_parameters(t)}
    x = torch.tensor([[0.5, 3.0, -1.0, 39.0, 2.0], [0.1, 0.0, 0.2, 0.0, -1.0]])
    out = model(x)
    out["a"].sum().backward()
    assert embeddings[0].grad[[3, 0]].abs().sum() > 0 and embeddings[0].grad[[1, 2]].abs().sum() == 0
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # index buffers are not saved
    fixed = build_model([polytask.Task("a", "classification", 2)], (5,), "mlp", {"hidden": [8]},
                        categorical=categorical, embedding_dim=2)
    assert [e.embedding_dim for e in fixed.encoder.embeddings] == [2, 2]
    with pytest.raises(DataError, match=r"categorical column 7 with 4 code\(s\) does not fit inputs of 5"):
        build_model([polytask.Task("a", "classification", 2)], (5,), categorical={7: 4})


def polytask_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def _config(root: Path, name: str) -> Path:
    cfg = root / f"{name}.yaml"
    cfg.write_text(f"""
seed: 1
suite: {{name: table, params: {{path: {root / 'data.csv'}, targets: [label, price]}}}}
model: {{backbone_params: {{hidden: [32]}}, embedding_dim: 3}}
train: {{epochs: 2, batch_size: 32, checkpoint_every: 3, optimizer: {{lr: 0.01}}}}
methods: [equal, upgrad, {{name: upgrad, grad_mode: representation, label: upgrad_rep}}]
baselines: {{single_task: false}}
output: {{dir: {root}, name: {name}}}
""")
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("categorical")
    _frame(200).to_csv(root / "data.csv", index=False)
    r = polytask_cli("run", str(_config(root, "ref")), "--quiet")
    assert r.returncode == 0, r.stderr
    return root / "ref"


def test_a_csv_with_a_text_column_trains_and_predicts_through_the_cli(reference: Path, tmp_path: Path) -> None:
    pre = json.loads((reference / "preprocessing.json").read_text())
    assert pre["categorical"] == {"1": len(pre["categories"]["color"]) + 1}
    summary = json.loads((reference / "summary.json").read_text())
    assert set(summary["results"]) == {"equal", "upgrad", "upgrad_rep"}
    predictor = polytask.load(reference, "equal")
    assert isinstance(predictor.model.encoder, Embedded)
    new = _frame(6, seed=9).drop(columns=["label", "price"])
    new.loc[0, "color"] = "mauve"  # unseen at training time: the unknown code, no error
    assert predictor.inputs(new)[0, 1].item() == 0
    got = predictor.predict(new)
    assert list(got.columns) == ["label", "price"] and set(got["label"]) <= {"hot", "cold"}
    new.to_csv(tmp_path / "new.csv", index=False)
    r = polytask_cli("predict", str(reference), "--job", "equal", "--input", str(tmp_path / "new.csv"),
                     "--out", str(tmp_path / "out.csv"))
    assert r.returncode == 0, r.stderr
    assert np.allclose(pd.read_csv(tmp_path / "out.csv")["price"], got["price"])


def test_sigkill_and_resume_is_bit_identical_with_embeddings(reference: Path, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_bytes((reference.parent / "data.csv").read_bytes())
    cfg = _config(tmp_path, "ref")  # the same name: identical outputs
    env = dict(os.environ, POLYTASK_KILL_AT="step:14")  # in upgrad's second epoch (4 steps an epoch)
    first = polytask_cli("run", str(cfg), "--quiet", env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    env.pop("POLYTASK_KILL_AT")
    again = polytask_cli("run", "--resume", str(tmp_path / "ref"), "--quiet", env=env)
    assert again.returncode == 0, again.stderr

    def weights(run: Path) -> dict[str, bytes]:
        return {f.relative_to(run).as_posix(): f.read_bytes() for f in sorted(run.glob("jobs/*/*.safetensors"))}

    assert weights(tmp_path / "ref") == weights(reference) and len(weights(reference)) >= 6
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
