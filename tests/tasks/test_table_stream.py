"""The streamed ``table`` suite (``stream: true``) and its batch source: the same suite as in memory, read a row
group at a time; batch order a pure function of (seed, epoch, step)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import polytask.tasks.suites  # noqa: F401  (registers the suites)
from polytask.engine.data import ChunkedRows, StreamBatches, TensorBatches, batch_source, stream_windows
from polytask.errors import DataError
from polytask.tasks.registry import build_suite
from polytask.tasks.suites.table_stream import TableRows
from polytask.tasks.task import SPLITS, TaskSuite

TARGETS = ["label", "score", "count", "flag"]


def frame(n: int = 600) -> pd.DataFrame:
    """Text, regression, small-integer and boolean targets (the first two with missing labels), five features."""
    rng = np.random.default_rng(0)
    f = pd.DataFrame({f"f{i}": rng.normal(3 * i, i + 1, n) for i in range(4)})
    f["i"] = rng.integers(0, 50, n)
    label = np.array(["cat", "dog", "emu"], dtype=object)[rng.integers(0, 3, n)]
    label[[1, 4, 500]] = None
    f["label"] = label
    score = rng.normal(6000, 2000, n)
    score[[3, 7, 333]] = np.nan
    f["score"] = score
    f["count"] = np.arange(n) % 4
    f["flag"] = rng.random(n) > 0.5
    return f


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    f = frame()
    out = {"parquet": tmp_path / "d.parquet", "big_groups": tmp_path / "big.parquet", "csv": tmp_path / "d.csv"}
    pq.write_table(pa.Table.from_pandas(f, preserve_index=False), out["parquet"], row_group_size=64)
    pq.write_table(pa.Table.from_pandas(f, preserve_index=False), out["big_groups"], row_group_size=600)
    f.to_csv(out["csv"], index=False)
    return out


def streamed(path: Path, seed: int = 0, **params) -> TaskSuite:
    return build_suite("table", {"path": str(path), "targets": TARGETS, "stream": True, "chunk_rows": 100,
                                 "shuffle_rows": 150, **params}, seed)


def assert_same_suite(memory: TaskSuite, stream: TaskSuite) -> None:
    assert [(t.name, t.kind, t.n_outputs, t.classes) for t in memory.tasks] == \
        [(t.name, t.kind, t.n_outputs, t.classes) for t in stream.tasks]
    np.testing.assert_allclose(memory.input_scale.mean, stream.input_scale.mean, rtol=1e-12)
    np.testing.assert_allclose(memory.input_scale.std, stream.input_scale.std, rtol=1e-12)
    for a, b in zip(memory.tasks, stream.tasks, strict=True):
        assert (a.scale is None) == (b.scale is None)
        if a.scale is not None:
            np.testing.assert_allclose(a.scale.mean + a.scale.std, b.scale.mean + b.scale.std, rtol=1e-12)
    for split in SPLITS:
        (m,), (s,) = memory.splits[split], stream.splits[split]
        assert isinstance(s.x, TableRows) and isinstance(s.x, ChunkedRows)
        assert torch.equal(m.index, s.index) and s.x.shape == m.x.shape
        torch.testing.assert_close(s.x[:], m.x, rtol=1e-6, atol=1e-6)
        for k in m.y:
            torch.testing.assert_close(s.y[k], m.y[k], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert memory.preprocessing()["features"] == stream.preprocessing()["features"]


def test_a_streamed_table_is_the_in_memory_suite(files: dict[str, Path]) -> None:
    memory = build_suite("table", {"path": str(files["parquet"]), "targets": TARGETS}, 0)
    assert {t.name: t.classes for t in memory.tasks}["flag"] == (False, True)
    for name in ("parquet", "big_groups", "csv"):
        stream = streamed(files[name])
        assert_same_suite(memory, stream)
        source = Path(stream.info["stream"]["source"])
        # a Parquet file with small row groups is read in place; a CSV and larger row groups go through the cache
        assert (source == files[name]) == (name == "parquet")
        assert max(stream.splits["train"][0].x.chunk_sizes()) <= 100
    other = streamed(files["parquet"], seed=1)
    assert not torch.equal(other.splits["train"][0].index, memory.splits["train"][0].index)


def test_the_csv_cache_is_written_once_and_reused(files: dict[str, Path], tmp_path: Path) -> None:
    first = Path(streamed(files["csv"]).info["stream"]["source"])
    assert first.parent == tmp_path / "cache" / "tables"  # $POLYTASK_CACHE_DIR (conftest sets it per test)
    stamp = first.stat().st_mtime_ns
    assert Path(streamed(files["csv"]).info["stream"]["source"]) == first and first.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, first.with_suffix(".json").name])
    os.utime(files["csv"], ns=(stamp + 10**9, stamp + 10**9))  # the source changed: a new cache
    assert Path(streamed(files["csv"]).info["stream"]["source"]) != first
    elsewhere = streamed(files["csv"], cache_dir=str(tmp_path / "mine"))
    assert Path(elsewhere.info["stream"]["source"]).parent == tmp_path / "mine"


def test_rows_read_like_a_tensor(files: dict[str, Path]) -> None:
    memory = build_suite("table", {"path": str(files["parquet"]), "targets": TARGETS}, 0).splits["val"][0].x
    rows = streamed(files["parquet"]).splits["val"][0].x
    assert len(rows) == len(memory) and rows.dtype == torch.float32 and rows.shape[1:] == memory.shape[1:]
    pick = torch.tensor([5, 0, len(memory) - 1, 5, 77])
    mask = torch.arange(len(memory)) % 3 == 0
    for key in (slice(10, 90), slice(None, None, 7), pick, mask, -1, 3):
        torch.testing.assert_close(rows[key], memory[key], rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError):
        rows[torch.tensor([len(memory)])]


def epoch_rows(source, seed: int, epoch: int) -> list[torch.Tensor]:
    batches = source.epoch(seed, epoch)
    return [batches[i].sources[0].index for i in range(len(batches))]


def test_batch_order_is_a_pure_function_of_seed_epoch_and_step(files: dict[str, Path]) -> None:
    suite = streamed(files["parquet"])
    source = batch_source(suite.splits, 32)
    assert isinstance(source, StreamBatches) and source.steps_per_epoch() == -(-len(suite.splits["train"][0]) // 32)
    order = epoch_rows(source, 3, 1)
    # fresh sources, with and without read-ahead, give the same batches; so does one asked for a step directly
    assert all(torch.equal(a, b) for a, b in zip(order, epoch_rows(StreamBatches(suite.splits, 32, read_ahead=False),
                                                                   3, 1), strict=True))
    for step in (len(order) - 1, 7, 0):
        assert torch.equal(StreamBatches(suite.splits, 32).epoch(3, 1)[step].sources[0].index, order[step])
    # every training row once per epoch, no validation or test row
    seen = torch.cat(order)
    assert len(seen) == len(set(seen.tolist())) and set(seen.tolist()) == set(suite.splits["train"][0].index.tolist())
    assert all(len(b) == 32 for b in order[:-1])
    # other seeds and epochs, other orders; the rows hold their own inputs and labels
    assert not torch.equal(torch.cat(epoch_rows(source, 4, 1)), seen)
    assert not torch.equal(torch.cat(epoch_rows(source, 3, 2)), seen)
    memory = build_suite("table", {"path": str(files["parquet"]), "targets": TARGETS}, 0).splits["train"][0]
    where = {int(r): i for i, r in enumerate(memory.index)}
    batch = source.epoch(3, 1)[5].sources[0]
    at = torch.tensor([where[int(r)] for r in batch.index])
    torch.testing.assert_close(batch.x, memory.x[at], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch.y["score"], memory.y["score"][at], equal_nan=True)
    # rows are shuffled across the row groups of a window (in file order a batch would span at most two)
    assert sum(len({int(r) // 64 for r in b}) >= 3 for b in order) > len(order) // 2


def test_windows_and_validation_batches(files: dict[str, Path]) -> None:
    sizes = [5, 0, 7, 3, 9]
    windows = stream_windows(sizes, 8, 0, 0)
    assert sorted(c for w in windows for c in w) == [0, 2, 3, 4]
    assert all(sum(sizes[c] for c in w) >= 8 for w in windows[:-1]) and windows == stream_windows(sizes, 8, 0, 0)
    assert stream_windows(sizes, 8, 0, 1) != windows or stream_windows(sizes, 8, 1, 0) != windows

    suite = streamed(files["parquet"])
    val_rows = set(suite.splits["val"][0].index.tolist())
    source = StreamBatches(suite.splits, 16, val_rows=100)
    a, b = source.val_batch(2, 9), StreamBatches(suite.splits, 16, val_rows=100).val_batch(2, 9)
    assert torch.equal(a.sources[0].index[a.rows[0]], b.sources[0].index[b.rows[0]]) and len(a.rows[0]) == 16
    assert set(a.sources[0].index.tolist()) <= val_rows and len(a.sources[0]) >= 100
    c = source.val_batch(2, 10)
    assert not torch.equal(a.sources[0].index[a.rows[0]], c.sources[0].index[c.rows[0]])
    # an in-memory suite keeps its in-memory source
    memory = build_suite("table", {"path": str(files["parquet"]), "targets": TARGETS}, 0)
    assert isinstance(batch_source(memory.splits, 16), TensorBatches)


def test_bad_cells_name_the_file_row(tmp_path: Path) -> None:
    f = frame()
    f["f1"] = f["f1"].astype(object)
    f.loc[413, "f1"] = "oops"
    f.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad\.csv: feature column 'f1' is not numeric \(row 413"):
        streamed(tmp_path / "bad.csv")
    g = frame()
    g.loc[290, "f2"] = np.inf
    pq.write_table(pa.Table.from_pandas(g, preserve_index=False), tmp_path / "inf.parquet", row_group_size=64)
    with pytest.raises(DataError, match=r"inf\.parquet: feature column 'f2' has a missing or infinite value at "
                                        r"row 290"):
        streamed(tmp_path / "inf.parquet")
    g = frame()
    g.loc[300, "score"] = -np.inf
    pq.write_table(pa.Table.from_pandas(g, preserve_index=False), tmp_path / "inf.parquet", row_group_size=64)
    with pytest.raises(DataError, match=r"inf\.parquet: target column 'score' is infinite at row 300"):
        streamed(tmp_path / "inf.parquet")
    with pytest.raises(DataError, match=r"has no column 'labl'.*'label'"):
        build_suite("table", {"path": str(tmp_path / "bad.csv"), "targets": ["labl"], "stream": True}, 0)
    h = frame()
    h["label"] = "cat"
    pq.write_table(pa.Table.from_pandas(h, preserve_index=False), tmp_path / "one.parquet", row_group_size=64)
    with pytest.raises(DataError, match=r"target column 'label' has a single class \['cat'\]"):
        streamed(tmp_path / "one.parquet")
    with pytest.raises(DataError, match=r"target column 'label' is not numeric, so it cannot be a regression"):
        build_suite("table", {"path": str(tmp_path / "one.parquet"), "targets": {"label": "regression"},
                              "stream": True}, 0)
