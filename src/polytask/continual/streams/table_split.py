"""``table``: a user's CSV or Parquet file as a stream, split into experiences by a column or by the target's classes.

- ``by: <a column>`` (e.g. region, school, year): one experience per value of the column, every experience the same
  target (domain-incremental: the inputs shift, the labels do not; ``scenario: task`` gives each value its own
  head). Each experience's rows are split into train/val/test with the seed.
- ``by: <the target>``: the target's classes arrive ``classes_per_experience`` at a time (class-incremental by
  default; task and domain as for ``split-digits``); rows are split into train/val/test stratified by class.
- ``text: <a column>``: the inputs are that column's texts, tokenized by a local tokenizer as the ``text`` suite does
  (int64 token ids and attention mask, shape (N, 2, L), for the ``hf`` backbone) instead of numeric features; the
  experiences are made as above. Token ids are not standardised.

The file is read, and the features and target encoded, by the ``table`` suite's functions (numeric complete
features, blank target cells are missing labels, class names as written). Features (and a regression target) are
standardised with the training rows of the **first experience only**: fitting on the training rows of the whole
stream would let statistics of later experiences (the future) shape what the model sees of earlier ones, so the
strict choice is the first experience's; later experiences are encoded with those statistics and may sit off-centre,
which is part of the shift being studied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.continual.stream import STREAMS, Experience, Stream, class_splits, seeded_groups
from polytask.errors import ConfigError, DataError
from polytask.registry import validate_model
from polytask.tasks.suites._digits import stratified_split
from polytask.tasks.suites.table import (
    TableParams,
    TargetKind,
    _check_columns,
    _feature_names,
    _features,
    _split_rows,
    _target,
    _tasks,
    read_table,
)
from polytask.tasks.suites.text import encode_text
from polytask.tasks.task import SPLITS, Standardizer, TaskData, TaskSuite

Value = str | int | float | bool
TOKENS = "none: the inputs are the token ids of a text column"


class TableStreamParams(BaseModel):
    """Parameters of the ``table`` stream."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a .csv, .tsv or .parquet file (.csv.gz and .tsv.gz too)")
    target: str = Field(description="the target column (one task)")
    kind: TargetKind = Field("auto", description="classification, regression or auto (as the table suite infers)")
    by: str = Field(description="the column whose values are the experiences, or the target itself: its classes "
                    "arrive a few at a time")
    scenario: Literal["task", "class", "domain"] | None = Field(
        None, description="default: domain when split by a column, class when split by the target")
    order: list[Value] | None = Field(None, description="the values (or classes) in arrival order (default: by the "
                                      "seed when shuffle, else sorted)")
    shuffle: bool = Field(False, description="draw the order from the seed")
    classes_per_experience: int = Field(2, ge=1, description="split by the target: classes per experience")
    features: list[str] | None = Field(None, description="feature columns; by default every column but the "
                                       "target and the by column")
    text: str | None = Field(None, description="a text column: the inputs are its tokens (for the hf backbone) "
                             "instead of numeric features")
    tokenizer: str | None = Field(None, description="with text: a local tokenizer directory (usually the model's "
                                  "own); never downloaded")
    max_length: int = Field(128, ge=2, description="with text: tokens per text, special tokens included; longer "
                            "texts are truncated")
    val_fraction: float = Field(0.2, gt=0, lt=0.5, description="share of each experience's rows in validation")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="share of each experience's rows in test")
    standardize: bool = Field(True, description="standardise features with the first experience's training rows")
    standardize_targets: bool = Field(True, description="standardise a regression target likewise")
    max_classes: int = Field(20, ge=2, description="auto: an integer column with at most this many values is "
                             "classification")

    @model_validator(mode="after")
    def _text(self) -> TableStreamParams:
        if self.text is None:
            if self.tokenizer is not None:
                raise ValueError("tokenizer is for a text column: set text too (or drop tokenizer)")
            return self
        if self.tokenizer is None:
            raise ValueError(f"text: {self.text!r} needs tokenizer (a local tokenizer directory)")
        if self.features is not None:
            raise ValueError("text and features exclude each other: the inputs are the text column's tokens")
        if self.text in (self.target, self.by):
            role = "target" if self.text == self.target else "by"
            raise ValueError(f"column {self.text!r} is both the text and the {role} column")
        return self


def _plain(value: Any) -> Value:
    """A numpy/pandas scalar as the Python value a user wrote (integer-valued floats as ints)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _ordered(names: Sequence[Value], order: Sequence[Value] | None, shuffle: bool, seed: int, what: str) -> list[int]:
    """Positions of ``names`` in arrival order: ``order`` (matched by text, so 2020 and "2020" are one value), else
    a seeded shuffle, else as sorted."""
    if order is None:
        return [int(i) for i in np.random.default_rng(seed).permutation(len(names))] if shuffle \
            else list(range(len(names)))
    text = {str(n): i for i, n in enumerate(names)}
    given = [str(v) for v in order]
    unknown = [v for v in given if v not in text]
    missing = [str(n) for n in names if str(n) not in given]
    if unknown or missing or len(set(given)) != len(given):
        raise ConfigError(f"stream.params.order: must list each {what} once; "
                          + "; ".join(p for p in (f"unknown {unknown}" if unknown else "",
                                                  f"missing {missing}" if missing else "",
                                                  "repeats a value" if len(set(given)) != len(given) else "") if p)
                          + f" (values: {[str(n) for n in names]})")
    return [text[v] for v in given]


@STREAMS.register("table", params=TableStreamParams,
                  summary="a CSV/Parquet file split by a column (domains: region, school, year) or by target class")
def table_stream(params: TableStreamParams, seed: int) -> Stream:
    """One experience per value of ``by`` (or per group of the target's classes when ``by`` is the target);
    ``info`` records the order, the rows of each experience and where the standardisation was fitted."""
    path = Path(params.path).expanduser()
    frame = read_table(path)
    columns = list(frame.columns)
    _check_columns([params.by], columns, path)
    features = [params.text] if params.text is not None else params.features if params.features is not None else \
        [c for c in columns if c not in (params.target, params.by)]
    table = validate_model(TableParams, {
        "path": params.path, "targets": {params.target: params.kind}, "features": features,
        "val_fraction": params.val_fraction, "test_fraction": params.test_fraction, "standardize": params.standardize,
        "standardize_targets": params.standardize_targets, "max_classes": params.max_classes}, "stream.params")
    assert isinstance(table, TableParams)
    features = _feature_names(table, columns, path)
    if params.text is not None:
        assert params.tokenizer is not None
        x = encode_text(frame, params.text, params.tokenizer, params.max_length, path)
    else:
        x = torch.from_numpy(_features(frame, features, path))
    labelled = {params.target: _target(frame[params.target], params.kind, params.max_classes, path)}
    info: dict[str, Any] = {"source": params.path, "seed": seed, "target": params.target, "by": params.by,
                            "features": features}
    if params.by == params.target:
        return _by_classes(params, path, x, labelled, info, seed)
    return _by_column(params, table, frame, path, x, labelled, info, seed)


def _scaled(x: torch.Tensor, train: np.ndarray, on: bool) -> tuple[torch.Tensor, Standardizer | None]:
    if not x.is_floating_point():  # token ids of a text column
        return x, None
    scale = Standardizer.fit(x[torch.from_numpy(train)]) if on else None
    return (x if scale is None else scale.encode(x)).float(), scale


def _by_column(params: TableStreamParams, table: TableParams, frame: Any, path: Path, x: torch.Tensor,
               labelled: dict[str, Any], info: dict[str, Any], seed: int) -> Stream:
    import pandas as pd

    scenario = params.scenario or "domain"
    if scenario == "class":
        raise ConfigError(f"stream.params.scenario: class-incremental splits the target's classes; set by: "
                          f"{params.target} (split by {params.by!r} is task or domain)")
    codes, uniques = pd.factorize(frame[params.by], sort=True)
    if (codes < 0).any():
        raise DataError(f"table {path}: column {params.by!r} is empty at row {int(np.argmax(codes < 0))} (counting "
                        "data rows from 0); every row needs the value that places it in an experience")
    values = [_plain(v) for v in uniques]
    order = _ordered(values, params.order, params.shuffle, seed, f"value of {params.by!r}")
    rngs = np.random.default_rng(seed).spawn(len(values))
    rows = []
    for k, rng in zip(order, rngs, strict=True):
        ids = np.flatnonzero(codes == k)
        try:
            rows.append([ids[part] for part in _split_rows(len(ids), table, rng, path)])
        except DataError:
            raise DataError(f"table {path}: {params.by} = {values[k]!r} has {len(ids)} row(s), too few for a "
                            f"train/val/test split (val_fraction {params.val_fraction}, test_fraction "
                            f"{params.test_fraction}); drop the value or merge it with another") from None
    first_train = torch.from_numpy(rows[0][0])
    (task,), targets = _tasks(labelled, first_train, table)
    x, scale = _scaled(x, rows[0][0], params.standardize)
    y = targets[task.name]
    experiences = []
    for i, (k, parts) in enumerate(zip(order, rows, strict=True)):
        name = str(values[k])
        t = task if scenario == "domain" else replace(task, name=f"{task.name}@{name}")
        data = {s: (TaskData(x[r], {t.name: y[r]}, r),) for s, r in
                zip(SPLITS, (torch.from_numpy(p) for p in parts), strict=True)}
        try:
            experiences.append(Experience(name, TaskSuite(f"table/{name}", (t,), data, {}, scale)))
        except DataError as e:
            raise DataError(f"table {path}: experience {i} ({params.by} = {values[k]!r}): {e}") from None
    info.update({"order": [values[k] for k in order], "rows": {str(values[k]): int((codes == k).sum()) for k in order},
                 "standardisation": TOKENS if params.text else
                 f"fitted on the training rows of {params.by} = {values[order[0]]!r}"})
    return Stream("table", scenario, tuple(experiences), info)


def _by_classes(params: TableStreamParams, path: Path, x: torch.Tensor, labelled: dict[str, Any],
                info: dict[str, Any], seed: int) -> Stream:
    kind, ids, names = labelled[params.target]
    if kind != "classification":
        raise ConfigError(f"stream.params.by: the target {params.target!r} is a regression target; it has no "
                          "classes to split by (split by another column, or set kind: classification)")
    present = np.flatnonzero(~np.isnan(ids))
    labels = np.where(np.isnan(ids), -1, ids).astype(np.int64)
    train_f = 1 - params.val_fraction - params.test_fraction
    parts = stratified_split(labels[present], (train_f, params.val_fraction, params.test_fraction),
                             np.random.default_rng(seed))
    rows = {s: present[p] for s, p in zip(SPLITS, parts, strict=True)}
    for c, name in enumerate(names):
        counts = {s: int((labels[r] == c).sum()) for s, r in rows.items()}
        if min(counts.values()) == 0:
            raise DataError(f"table {path}: class {name!r} of {params.target!r} has {int((labels == c).sum())} "
                            f"row(s), too few for one in each of train, val and test ({counts}); drop the class "
                            "or lower val_fraction/test_fraction")
    order = _ordered(names, params.order, params.shuffle, seed, f"class of {params.target!r}")
    groups = seeded_groups(range(len(names)), params.classes_per_experience, order, seed, False)
    first = rows["train"][np.isin(labels[rows["train"]], groups[0])]
    x, scale = _scaled(x, first, params.standardize)
    info.update({"order": [names[c] for c in order],
                 "standardisation": TOKENS if params.text else
                 f"fitted on the training rows of classes {[names[c] for c in groups[0]]}"})
    stream = class_splits("table", x, labels, rows, groups, params.scenario or "class", info, names)
    return replace(stream, experiences=tuple(
        replace(e, suite=replace(e.suite, input_scale=scale)) for e in stream.experiences))
