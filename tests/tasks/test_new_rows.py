"""A table suite's saved preprocessing applied to new rows gives what training saw (the seam of `polytask predict`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polytask.errors import DataError
from polytask.tasks import Task, build_suite
from polytask.tasks.suites.table import encode_features
from polytask.tasks.task import HeadSpec, Standardizer


@pytest.fixture(scope="module")
def frame_and_suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path, object]:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"f0": rng.normal(50, 9, 200), "f1": rng.normal(-3, 0.1, 200),
                          "label": rng.choice(["no", "yes"], 200), "price": rng.normal(6000, 2000, 200)})
    path = tmp_path_factory.mktemp("rows") / "t.csv"
    frame.to_csv(path, index=False)
    return frame, path, build_suite("table", {"path": str(path), "targets": ["label", "price"]}, 0)


def test_new_rows_encode_bit_identically_to_the_training_inputs(frame_and_suite) -> None:
    _, path, suite = frame_and_suite
    saved = json.loads(json.dumps(suite.preprocessing()))  # as read back from preprocessing.json
    (train,) = suite.splits["train"]
    rows = pd.read_csv(path).iloc[train.index.numpy()][["f1", "f0"]]  # any column order
    x = encode_features(rows, saved["features"], Standardizer.from_json(saved["input_standardize"]), path)
    assert x.dtype == torch.float32 and torch.equal(x, train.x)
    assert saved["input_shape"] == [2]


def test_tasks_and_scalers_round_trip_through_the_saved_json(frame_and_suite) -> None:
    _, _, suite = frame_and_suite
    saved = json.loads(json.dumps(suite.preprocessing()))
    for t in suite.tasks:
        assert Task.from_preprocessing(t.name, saved["tasks"][t.name]) == t
    assert suite.task("label").classes == ("no", "yes")
    headed = Task("h", "regression", 2, head=HeadSpec((8, 4)), scale=Standardizer((1.0, 2.0), (3.0, 4.0)))
    assert Task.from_preprocessing("h", json.loads(json.dumps(headed.preprocessing()))) == headed


def test_missing_and_extra_columns_are_one_error_naming_them_and_the_file(frame_and_suite) -> None:
    frame, path, suite = frame_and_suite
    with pytest.raises(DataError, match=rf"table {path}: missing feature column\(s\) 'f0'; extra column\(s\) "
                                        r"'label', 'other' \('label': target column\(s\) of the run; drop them\); "
                                        r"the model reads exactly the feature columns 'f0', 'f1'"):
        encode_features(frame[["f1", "label"]].assign(other=0), ["f0", "f1"], suite.input_scale, path,
                        suite.task_names)
