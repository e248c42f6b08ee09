"""The built-in suites: shapes, determinism, split hygiene, planted structure and data errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import polytask.tasks.suites  # noqa: F401  (registers the suites)
from polytask.errors import ConfigError, DataError
from polytask.tasks.registry import SUITES, build_suite
from polytask.tasks.suites._digits import sklearn_digits
from polytask.tasks.task import SPLITS, TaskSuite

SMALL_PAIRS = {"n_train": 300, "n_val": 100, "n_test": 100}


def assert_same(a: TaskSuite, b: TaskSuite) -> None:
    for split in SPLITS:
        for sa, sb in zip(a.splits[split], b.splits[split], strict=True):
            assert torch.equal(sa.x, sb.x)
            assert sa.y.keys() == sb.y.keys()
            for k in sa.y:
                torch.testing.assert_close(sa.y[k], sb.y[k], rtol=0, atol=0, equal_nan=True)
            assert torch.equal(sa.index, sb.index)


def source_ids(suite: TaskSuite, split: str) -> set[int]:
    return set(suite.splits[split][0].index.reshape(-1).tolist())


def assert_disjoint_pools(suite: TaskSuite) -> None:
    train, val, test = (source_ids(suite, s) for s in SPLITS)
    assert not train & val and not train & test and not val & test


def test_all_suites_register() -> None:
    assert {"multidigits", "digit-attributes", "synthetic", "multimnist", "table"} <= set(
        SUITES.names()
    )


# --- multidigits -------------------------------------------------------------------------------


def test_multidigits_shapes_labels_and_hygiene() -> None:
    suite = build_suite("multidigits", SMALL_PAIRS, seed=0)
    assert suite.task_names == ["left", "right"]
    assert all(t.n_outputs == 10 and t.kind == "classification" for t in suite.tasks)
    _, labels = sklearn_digits()
    for split, n in zip(SPLITS, SMALL_PAIRS.values(), strict=True):
        (data,) = suite.splits[split]
        assert data.x.shape == (n, 1, 12, 12) and data.x.dtype == torch.float32
        assert data.x.min() >= 0 and data.x.max() <= 1
        assert data.index.shape == (n, 2) and data.index.dtype == torch.int64
        assert (data.index[:, 0] != data.index[:, 1]).all()
        idx = data.index.numpy()
        assert np.array_equal(data.y["left"].numpy(), labels[idx[:, 0]].astype(np.float32))
        assert np.array_equal(data.y["right"].numpy(), labels[idx[:, 1]].astype(np.float32))
    assert_disjoint_pools(suite)
    assert suite.info["params"]["canvas"] == 12


def test_multidigits_layout_without_jitter() -> None:
    suite = build_suite("multidigits", {**SMALL_PAIRS, "canvas": 16, "jitter": 0}, seed=1)
    images, _ = sklearn_digits()
    (data,) = suite.splits["train"]
    idx = data.index.numpy()
    assert np.array_equal(data.x[:, 0, :8, :8].numpy(), images[idx[:, 0]])
    assert np.array_equal(data.x[:, 0, 8:, 8:].numpy(), images[idx[:, 1]])
    assert data.x[:, 0, :8, 8:].abs().sum() == 0


def test_multidigits_determinism_and_validation() -> None:
    a = build_suite("multidigits", SMALL_PAIRS, seed=3)
    assert_same(a, build_suite("multidigits", SMALL_PAIRS, seed=3))
    b = build_suite("multidigits", SMALL_PAIRS, seed=4)
    assert not torch.equal(a.splits["train"][0].x, b.splits["train"][0].x)
    with pytest.raises(ValueError, match="canvas"):
        build_suite("multidigits", {"canvas": 8, "jitter": 1}, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        build_suite("multidigits", {"train_fraction": 0.5}, seed=0)
    with pytest.raises(ConfigError, match=r"unknown key 'suite\.params\.canvass'.*'canvas'"):
        build_suite("multidigits", {"canvass": 12}, seed=0)


# --- digit-attributes --------------------------------------------------------------------------


def test_digit_attributes_tasks_and_consistency() -> None:
    suite = build_suite("digit-attributes", None, seed=0)
    n_outputs = {t.name: t.n_outputs for t in suite.tasks}
    assert n_outputs == {"digit": 10, "even": 2, "ge5": 2, "prime": 2, "loop": 2, "mod3": 3}
    assert suite.input_shape == (1, 8, 8)
    assert sum(len(suite.splits[s][0]) for s in SPLITS) == 1797
    assert_disjoint_pools(suite)
    images, labels = sklearn_digits()
    for split in SPLITS:
        (data,) = suite.splits[split]
        d = data.y["digit"].long()
        assert torch.equal(d, torch.from_numpy(labels[data.index.numpy()]))
        assert torch.equal(data.x[:, 0], torch.from_numpy(images[data.index.numpy()]))
        assert torch.equal(data.y["even"], (d % 2 == 0).float())
        assert torch.equal(data.y["ge5"], (d >= 5).float())
        assert torch.equal(data.y["prime"], torch.isin(d, torch.tensor([2, 3, 5, 7])).float())
        assert torch.equal(data.y["loop"], torch.isin(d, torch.tensor([0, 6, 8, 9])).float())
        assert torch.equal(data.y["mod3"], (d % 3).float())
    # the split is stratified: every class appears in every split
    assert all(len(suite.splits[s][0].y["digit"].unique()) == 10 for s in SPLITS)


def test_digit_attributes_determinism_and_noise() -> None:
    a = build_suite("digit-attributes", None, seed=5)
    assert_same(a, build_suite("digit-attributes", None, seed=5))
    b = build_suite("digit-attributes", None, seed=6)
    assert not torch.equal(a.splits["train"][0].index, b.splits["train"][0].index)
    noisy = build_suite("digit-attributes", {"noise": 0.2}, seed=5)
    assert torch.equal(noisy.splits["train"][0].index, a.splits["train"][0].index)
    assert not torch.equal(noisy.splits["train"][0].x, a.splits["train"][0].x)
    assert noisy.splits["train"][0].x.min() >= 0 and noisy.splits["train"][0].x.max() <= 1


# --- synthetic ---------------------------------------------------------------------------------


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def test_synthetic_planted_structure() -> None:
    suite = build_suite("synthetic", {"noise": 0.01, "task_jitter": 0.05}, seed=0)
    groups = suite.info["planted_groups"]
    assert groups == [["g0_t0", "g0_t1", "g0_t2"], ["g1_t0", "g1_t1", "g1_t2"],
                      ["g2_t0", "g2_t1"], ["u0"], ["c0_a"], ["c0_b"]]
    assert suite.info["conflicting_pairs"] == [["c0_a", "c0_b"]]
    assert suite.task_names == [n for g in groups for n in g]
    (train,) = suite.splits["train"]
    assert train.x.shape == (2000, 16) and train.x.dtype == torch.float32
    assert all(t.kind == "regression" and t.n_outputs == 1 for t in suite.tasks)
    for group in groups[:3]:
        for other in group[1:]:
            assert abs(_corr(train.y[group[0]], train.y[other])) > 0.8
    assert _corr(train.y["c0_a"], train.y["c0_b"]) < -0.8
    assert abs(float(train.y["g0_t0"].std()) - 1) < 0.05


def test_synthetic_classification_missing_and_determinism() -> None:
    params = {"kind": "classification", "groups": [2], "missing": {"g0_t1": 0.3}}
    suite = build_suite("synthetic", params, seed=1)
    assert all(t.kind == "classification" and t.n_outputs == 2 for t in suite.tasks)
    for split in SPLITS:
        (data,) = suite.splits[split]
        assert set(data.y["u0"].unique().tolist()) == {0.0, 1.0}
        assert torch.equal(data.y["c0_b"], 1 - data.y["c0_a"])
        frac = float(torch.isnan(data.y["g0_t1"]).float().mean())
        assert abs(frac - 0.3) < 0.01
        assert not torch.isnan(data.y["g0_t0"]).any()
    assert_same(suite, build_suite("synthetic", params, seed=1))
    other = build_suite("synthetic", params, seed=2)
    assert not torch.equal(suite.splits["train"][0].x, other.splits["train"][0].x)
    ids = [source_ids(suite, s) for s in SPLITS]
    assert not ids[0] & ids[1] and not ids[1] & ids[2]


def test_synthetic_rejects_unknown_missing_task() -> None:
    with pytest.raises(ValueError, match="g9_t0"):
        build_suite("synthetic", {"missing": {"g9_t0": 0.5}}, seed=0)
    with pytest.raises(ValueError):
        build_suite("synthetic", {"missing": {"u0": 1.0}}, seed=0)


# --- multimnist --------------------------------------------------------------------------------


def _fake_mnist(n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }


def _write_idx(path: Path, array: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _write_idx_dir(directory: Path, mnist: dict[str, np.ndarray], gz: bool) -> Path:
    from polytask.tasks.suites.multimnist import IDX_FILES

    directory.mkdir()
    for key, name in IDX_FILES.items():
        _write_idx(directory / (name + (".gz" if gz else "")), mnist[key])
    return directory


MNIST_PAIRS = {"n_train": 50, "n_val": 20, "n_test": 30, "val_fraction": 0.2}


def test_multimnist_from_npz(tmp_path: Path) -> None:
    mnist = _fake_mnist()
    np.savez(tmp_path / "mnist.npz", **mnist)
    params = {"path": str(tmp_path / "mnist.npz"), **MNIST_PAIRS}
    suite = build_suite("multimnist", params, seed=0)
    assert suite.task_names == ["left", "right"] and suite.input_shape == (1, 36, 36)
    assert all(t.n_outputs == 10 for t in suite.tasks)
    images = np.concatenate([mnist["x_train"], mnist["x_test"]])
    labels = np.concatenate([mnist["y_train"], mnist["y_test"]])
    for split, key in zip(SPLITS, ("n_train", "n_val", "n_test"), strict=True):
        (data,) = suite.splits[split]
        assert len(data) == MNIST_PAIRS[key] and data.x.dtype == torch.float32
        assert data.x.min() >= 0 and data.x.max() <= 1
        idx = data.index.numpy()
        assert np.array_equal(data.y["left"].numpy(), labels[idx[:, 0]])
        assert np.array_equal(data.y["right"].numpy(), labels[idx[:, 1]])
    assert_disjoint_pools(suite)
    assert min(source_ids(suite, "test")) >= 60
    assert max(source_ids(suite, "train") | source_ids(suite, "val")) < 60
    assert len(source_ids(suite, "val")) <= 12
    assert_same(suite, build_suite("multimnist", params, seed=0))
    other = build_suite("multimnist", params, seed=1)
    assert not torch.equal(suite.splits["train"][0].x, other.splits["train"][0].x)

    flat = build_suite("multimnist", {**params, "canvas": 56, "jitter": 0}, seed=0)
    (data,) = flat.splits["test"]
    idx = data.index.numpy()
    assert np.allclose(data.x[:, 0, :28, :28].numpy(), images[idx[:, 0]] / 255)
    assert np.allclose(data.x[:, 0, 28:, 28:].numpy(), images[idx[:, 1]] / 255)

    small = build_suite("multimnist", {**params, "resize": 28}, seed=0)
    assert small.input_shape == (1, 28, 28)
    assert small.splits["train"][0].x.min() >= 0 and small.splits["train"][0].x.max() <= 1


@pytest.mark.parametrize("gz", [False, True])
def test_multimnist_from_idx_matches_npz(tmp_path: Path, gz: bool) -> None:
    mnist = _fake_mnist()
    np.savez(tmp_path / "mnist.npz", **mnist)
    directory = _write_idx_dir(tmp_path / "idx", mnist, gz)
    from_idx = build_suite("multimnist", {"path": str(directory), **MNIST_PAIRS}, seed=2)
    from_npz = build_suite("multimnist", {"path": str(tmp_path / "mnist.npz"), **MNIST_PAIRS}, 2)
    assert_same(from_idx, from_npz)


def test_multimnist_data_errors(tmp_path: Path) -> None:
    mnist = _fake_mnist()
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(DataError, match=r"nowhere\.npz"):
        build_suite("multimnist", {"path": str(missing)}, seed=0)

    directory = _write_idx_dir(tmp_path / "idx", mnist, gz=False)
    labels = directory / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*truncated"):
        build_suite("multimnist", {"path": str(directory)}, seed=0)
    labels.write_bytes(b"\x12\x34\x08\x01" + bytes(10))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte is not an IDX file"):
        build_suite("multimnist", {"path": str(directory)}, seed=0)
    labels.unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        build_suite("multimnist", {"path": str(directory)}, seed=0)

    gz_dir = _write_idx_dir(tmp_path / "gz", mnist, gz=True)
    images = gz_dir / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        build_suite("multimnist", {"path": str(gz_dir)}, seed=0)

    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=mnist["x_train"], y_train=mnist["y_train"])
    with pytest.raises(DataError, match=r"partial\.npz.*x_test"):
        build_suite("multimnist", {"path": str(partial)}, seed=0)


# --- table -------------------------------------------------------------------------------------


def _frame(n: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    score = rng.normal(size=n)
    score[[3, 7]] = np.nan
    label = np.array(["cat", "dog", "emu"], dtype=object)[np.arange(n) % 3]
    label[[1, 4]] = None
    return pd.DataFrame({
        "f1": rng.normal(5, 2, n),
        "f2": rng.integers(0, 100, n),
        "label": label,
        "score": score,
        "count": np.arange(n) % 4,
    })


def test_table_from_csv_and_parquet(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "data.csv", index=False)
    frame.to_parquet(tmp_path / "data.parquet", index=False)
    targets = ["label", "score", "count"]
    csv = build_suite("table", {"path": str(tmp_path / "data.csv"), "targets": targets}, 0)
    kinds = {t.name: (t.kind, t.n_outputs) for t in csv.tasks}
    assert kinds == {"label": ("classification", 3), "score": ("regression", 1),
                     "count": ("classification", 4)}
    assert csv.info["features"] == ["f1", "f2"]
    assert {t.name: t.classes for t in csv.tasks} == {"label": ("cat", "dog", "emu"), "score": (),
                                                      "count": (0, 1, 2, 3)}
    assert [len(csv.splits[s][0]) for s in SPLITS] == [30, 10, 10]
    assert_disjoint_pools(csv)
    rows = torch.cat([csv.splits[s][0].index for s in SPLITS])
    y = {k: torch.cat([csv.splits[s][0].y[k] for s in SPLITS]) for k in targets}
    assert set(torch.nonzero(torch.isnan(y["label"])).flatten().tolist()) == {
        int(torch.nonzero(rows == r)) for r in (1, 4)
    }
    assert torch.isnan(y["score"]).sum() == 2
    order = rows.argsort()
    expected = frame["label"].map({"cat": 0, "dog": 1, "emu": 2}).to_numpy(dtype=np.float32)
    assert np.allclose(y["label"][order].numpy(), expected, equal_nan=True)
    (train,) = csv.splits["train"]
    assert train.x.shape == (30, 2) and train.x.dtype == torch.float32
    assert torch.allclose(train.x.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(train.x.std(0, unbiased=False), torch.ones(2), atol=1e-4)
    parquet = build_suite("table", {"path": str(tmp_path / "data.parquet"), "targets": targets}, 0)
    assert_same(csv, parquet)
    assert_same(csv, build_suite("table", {"path": str(tmp_path / "data.csv"),
                                            "targets": targets}, 0))
    other = build_suite("table", {"path": str(tmp_path / "data.csv"), "targets": targets}, 1)
    assert not torch.equal(other.splits["train"][0].index, train.index)


def test_table_explicit_kinds_and_features(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    _frame().to_csv(path, index=False)
    suite = build_suite("table", {"path": str(path), "targets": {"count": "regression"},
                                  "features": ["f1"], "standardize": False}, 0)
    assert [(t.name, t.kind) for t in suite.tasks] == [("count", "regression")]
    assert suite.input_shape == (1,) and suite.input_scale is None
    raw = torch.tensor(_frame()["f1"].to_numpy(), dtype=torch.float32)
    (train,) = suite.splits["train"]
    assert torch.equal(train.x[:, 0], raw[train.index])
    with pytest.raises(DataError, match=r"'label'.*not numeric"):
        build_suite("table", {"path": str(path), "targets": {"label": "regression"},
                              "features": ["f1"]}, 0)


def test_table_errors_name_column_and_file(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    frame = _frame()
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"data\.csv has no column 'scor'.*'score'"):
        build_suite("table", {"path": str(path), "targets": ["scor"]}, 0)
    with pytest.raises(DataError, match=r"data\.csv has no column 'f3'"):
        build_suite("table", {"path": str(path), "targets": ["score"], "features": ["f3"]}, 0)
    with pytest.raises(DataError, match=r"nowhere\.csv"):
        build_suite("table", {"path": str(tmp_path / "nowhere.csv"), "targets": ["score"]}, 0)
    with pytest.raises(ValueError, match="both features and targets"):
        build_suite("table", {"path": str(path), "targets": ["score"], "features": ["score"]}, 0)

    bad = frame.astype({"f1": object})
    bad.loc[6, "f1"] = "oops"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"data\.csv: feature column 'f1' is not numeric \(row 6"):
        build_suite("table", {"path": str(path), "targets": ["score"]}, 0)
    hole = frame.copy()
    hole.loc[9, "f2"] = np.nan
    hole.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"data\.csv: feature column 'f2' has a missing"):
        build_suite("table", {"path": str(path), "targets": ["score"]}, 0)
