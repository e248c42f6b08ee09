"""``text``: the label columns of a CSV or Parquet file as tasks on one text column, tokenized for a transformer.

The file is read as the ``table`` suite reads it, and targets are made the same way (class labels, NaN for a
blank cell, regression targets standardised with the training split's statistics). The text column is tokenized
with a local Hugging Face tokenizer (``transformers.AutoTokenizer``, never downloaded) into int64 inputs of shape
(N, 2, L): token ids and attention mask stacked, padded to the longest row (at most ``max_length`` tokens; longer
texts are truncated). The ``hf`` backbone reads exactly that. ``TaskSuite.preprocessing()`` carries the column,
the tokenizer directory and ``max_length`` (``info["text"]``), so ``polytask predict`` tokenizes new rows alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.errors import DataError
from polytask.tasks.registry import SUITES
from polytask.tasks.suites.table import TargetKind, _check_columns, _split_rows, _target, read_table
from polytask.tasks.task import SPLITS, Standardizer, Task, TaskData, TaskSuite

if TYPE_CHECKING:
    import pandas as pd


class TextParams(BaseModel):
    """Parameters of the ``text`` suite."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a .csv, .tsv or .parquet file (.csv.gz and .tsv.gz too)")
    text: str = Field(description="the column holding the text")
    targets: list[str] | dict[str, TargetKind] = Field(
        description="target columns, or column -> classification / regression / auto")
    tokenizer: str = Field(description="a local tokenizer directory (usually the model's own directory, as "
                           "save_pretrained writes it); never downloaded")
    max_length: int = Field(128, ge=2, description="tokens per text, special tokens included; longer texts are "
                            "truncated")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of rows in validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of rows in test")
    standardize_targets: bool = Field(True, description="train regression targets standardised with train mean "
                                      "and std (metrics are reported in the original units either way)")
    max_classes: int = Field(20, ge=2, description="auto: an integer-valued column with at most this many "
                             "distinct values is a classification target")

    @model_validator(mode="after")
    def _check(self) -> TextParams:
        targets = list(self.targets)
        if not targets:
            raise ValueError("targets is empty: name at least one target column")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets repeat a column: {targets}")
        if self.text in targets:
            raise ValueError(f"column {self.text!r} is both the text and a target")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in ``directory`` (local files only), or a DataError naming the directory."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise DataError(f"text: tokenizer directory {path} does not exist; give a local Hugging Face model or "
                        "tokenizer directory (polytask never downloads one)")
    from transformers import AutoTokenizer

    from polytask.models.hf import _quiet

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"text: cannot load a tokenizer from {path}: {e}") from None


def _texts(frame: pd.DataFrame, column: str, path: Path | str) -> list[str]:
    """The column's cells as strings; a missing or blank one is a DataError naming the row."""
    values = frame[column]
    blank = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()
    if blank.any():
        row = int(np.argmax(blank))
        raise DataError(f"table {path}: text column {column!r} is empty at row {row} (counting data rows from 0); "
                        "every row needs a text")
    return values.astype(str).tolist()


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> tuple[torch.Tensor, int | None]:
    """int64 (N, 2, L): token ids and attention mask stacked, padded to the longest row (L <= ``max_length``);
    and how many texts were truncated (None when the tokenizer does not say: only fast tokenizers do)."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    encodings = getattr(enc, "encodings", None)
    truncated = sum(bool(e.overflowing) for e in encodings) if encodings else None
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long(), truncated


def encode_text(frame: pd.DataFrame, column: str, tokenizer: str, max_length: int,
                path: Path | str = "<DataFrame>") -> torch.Tensor:
    """New rows as a model trained on a ``text`` suite reads them: the ``column`` tokenized as in training (the
    run's ``preprocessing.json`` holds these arguments). Other columns are not read."""
    _check_columns([column], [str(c) for c in frame.columns], Path(path))
    return tokenize(_texts(frame, column, path), load_tokenizer(tokenizer), max_length)[0]


@SUITES.register(
    "text",
    params=TextParams,
    summary="label columns of a CSV/Parquet file as tasks on a text column, tokenized by a local HF tokenizer",
)
def build(params: TextParams, seed: int) -> TaskSuite:
    """One multi-target source per split; labels of each target column, NaN where blank."""
    path = Path(params.path).expanduser()
    frame = read_table(path)
    kinds = dict(params.targets) if isinstance(params.targets, dict) else dict.fromkeys(params.targets, "auto")
    _check_columns([params.text, *kinds], list(frame.columns), path)
    tokenizer_dir = Path(params.tokenizer).expanduser().resolve()
    x, truncated = tokenize(_texts(frame, params.text, path), load_tokenizer(tokenizer_dir), params.max_length)
    rows = [torch.from_numpy(r.astype(np.int64)) for r in
            _split_rows(len(frame), params, np.random.default_rng(seed), path)]
    tasks, targets = [], {}
    for name, requested in kinds.items():
        kind, values, names = _target(frame[name], requested, params.max_classes, path)
        y = torch.tensor(values, dtype=torch.float64)
        scale = None
        if kind == "regression" and params.standardize_targets:
            scale = Standardizer.fit(y[rows[0]])
            y = scale.encode(y)
        tasks.append(Task(name, kind, len(names) if names else 1, classes=tuple(names or ()), scale=scale))
        targets[name] = y.float()
    info: dict[str, Any] = {
        "params": params.model_dump(mode="json"),
        "text": {"column": params.text, "tokenizer": str(tokenizer_dir), "max_length": params.max_length},
        "truncated_rows": truncated,
        "kinds": {t.name: t.kind for t in tasks},
    }
    splits = {
        split: (TaskData(x[r], {name: t[r] for name, t in targets.items()}, r),)
        for split, r in zip(SPLITS, rows, strict=True)
    }
    return TaskSuite("text", tuple(tasks), splits, info)
