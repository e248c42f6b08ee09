"""``table``: the columns of a user's CSV or Parquet file as tasks on the other columns.

Each target column is one task labelled on every row (empty cells are missing labels, NaN);
numeric features must be complete. Rows are shuffled into train/val/test with the seed. Features
and regression targets are standardised with train statistics only, so nothing leaks from val or test
and a target of 6000 ± 2100 trains on the same scale as a cross-entropy; metrics stay in the original
units (``Task.scores``), and ``TaskSuite.preprocessing()`` holds the fitted maps and class labels.

Categorical features (``categorical``: the columns named, or by default every feature column of text, no cell of
which is a number) are read as category codes: the column's values on the training rows, as text
(:func:`category_keys`), sorted, are codes 1..K; a value the training rows lack and a missing cell are code 0,
"unknown" (so validation, test and new rows at predict time never fail on a new value, and no val/test value leaks
into the codes). The input tensor holds the code (an exact float32 integer) in the column's place, left out of the
standardisation; ``TaskSuite.categorical`` tells the model each such column and its K + 1 codes, and the model
embeds them (:class:`polytask.models.embedding.Embedded`). The categories are saved in ``preprocessing.json``
(``categories``), so ``polytask predict`` codes new rows the same way. A column mixing numbers and text is an error
naming a text cell (a typo in a numeric column is more likely than a categorical column of numbers and words);
name it in ``categorical`` to read it as categories.

Tables larger than memory: ``stream: true`` (off by default; never chosen by size, because the streamed batch order
differs from the in-memory one, so a run's numbers must not change when its file grows past a threshold) reads the
file a Parquet row group at a time (:mod:`polytask.tasks.suites.table_stream`): the same rows in each split, the
same class labels, the same standardisation to rounding, but the inputs stay on disk (``TableRows``) and the
engine serves them with ``StreamBatches`` (chunks in a seeded order per epoch, rows shuffled within windows of
``shuffle_rows``; step ``s`` of epoch ``e`` a pure function of (seed, e, s), so resuming is exact). A CSV (no random
access) is first rewritten into a Parquet cache with row groups of ``chunk_rows`` rows. Memory holds the targets,
the split's row ids and a few chunks; evaluation reads its split a row group at a time.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.errors import DataError
from polytask.tasks.registry import SUITES
from polytask.tasks.task import ACCURACY, AUC, SPLITS, Kind, Standardizer, Task, TaskData, TaskSuite

if TYPE_CHECKING:
    import pandas as pd

TargetKind = Literal["classification", "regression", "auto"]


class TableParams(BaseModel):
    """Parameters of the ``table`` suite."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a .csv, .tsv or .parquet file (.csv.gz and .tsv.gz too)")
    targets: list[str] | dict[str, TargetKind] = Field(
        description="target columns, or column -> classification / regression / auto"
    )
    features: list[str] | None = Field(
        None, description="feature columns; by default every column that is not a target"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of rows in validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of rows in test")
    standardize: bool = Field(True, description="standardise features with train mean and std")
    categorical: list[str] | None = Field(
        None, description="feature columns read as categories (codes fitted on the training rows, embedded by the "
        "model; unseen or missing values are code 0, unknown); by default every feature column of text (no cell a "
        "number); [] reads every feature as a number"
    )
    standardize_targets: bool = Field(
        True, description="train regression targets standardised with train mean and std (metrics are "
        "reported in the original units either way)"
    )
    auc: bool = Field(
        False, description="also score every two-class target by ROC AUC (after accuracy; for rare labels, "
        "where accuracy says little)"
    )
    max_classes: int = Field(
        20, ge=2, description="auto: an integer-valued column with at most this many distinct "
        "values is a classification target"
    )
    stream: bool = Field(
        False, description="read the file a chunk at a time instead of into memory (for tables larger than "
        "memory; see the module docstring); off: the whole file is read, as always"
    )
    chunk_rows: int = Field(
        65536, ge=16, description="stream: rows per chunk; a CSV, or a Parquet file with larger row groups, is "
        "first rewritten into a Parquet cache with row groups of this many rows"
    )
    shuffle_rows: int = Field(
        262144, ge=1, description="stream: rows shuffled together (chunks are drawn in a random order per epoch, "
        "then the rows of consecutive chunks adding up to this many are shuffled together)"
    )
    cache_dir: str | None = Field(
        None, description="stream: where the Parquet cache of a CSV goes (default $POLYTASK_CACHE_DIR/tables, "
        "else ~/.cache/polytask/tables)"
    )

    @model_validator(mode="after")
    def _check(self) -> TableParams:
        targets = list(self.targets)
        if not targets:
            raise ValueError("targets is empty: name at least one target column")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets repeat a column: {targets}")
        if self.features is not None:
            if len(set(self.features)) != len(self.features):
                raise ValueError(f"features repeat a column: {self.features}")
            both = [c for c in self.features if c in targets]
            if both:
                raise ValueError(f"column(s) {both} are both features and targets")
        if self.categorical:
            if len(set(self.categorical)) != len(self.categorical):
                raise ValueError(f"categorical repeats a column: {self.categorical}")
            both = [c for c in self.categorical if c in targets]
            if both:
                raise ValueError(f"categorical column(s) {both} are targets; a categorical column is a feature")
            if self.features is not None:
                outside = [c for c in self.categorical if c not in self.features]
                if outside:
                    raise ValueError(f"categorical column(s) {outside} are not among the features {self.features}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self

    def target_kinds(self) -> dict[str, TargetKind]:
        """Each target column with its requested kind (``auto`` when only named)."""
        if isinstance(self.targets, dict):
            return dict(self.targets)
        return {name: "auto" for name in self.targets}


def _file_kind(path: Path) -> str:
    """The table's format by its suffix: ``.csv``, ``.tsv``, ``.parquet``, ``.pq`` (a ``.gz`` suffix is dropped)."""
    return Path(path.name.lower().removesuffix(".gz")).suffix


def read_table(path: Path) -> pd.DataFrame:
    """The file as a DataFrame with string column names; the reader is chosen by suffix."""
    import pandas as pd  # imported on use: pandas is slow to import and only tables need it

    if not path.is_file():
        raise DataError(f"table {path} does not exist")
    kind = _file_kind(path)
    readers = {
        ".csv": pd.read_csv,
        ".tsv": lambda p: pd.read_csv(p, sep="\t"),
        ".parquet": pd.read_parquet,
        ".pq": pd.read_parquet,
    }
    if kind not in readers:
        raise DataError(f"table {path}: unknown file type {kind!r}; use .csv, .tsv or .parquet")
    try:
        frame = readers[kind](path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read table {path}: {e}") from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _check_columns(names: Sequence[str], columns: Sequence[str], path: Path) -> None:
    for name in names:
        if name not in columns:
            close = difflib.get_close_matches(name, columns, n=3, cutoff=0.6)
            hint = (f"close matches: {', '.join(map(repr, close))}" if close
                    else f"columns: {', '.join(map(repr, columns[:20]))}"
                    + (", ..." if len(columns) > 20 else ""))
            raise DataError(f"table {path} has no column {name!r}; {hint}")


def _feature_names(params: TableParams, columns: Sequence[str], path: Path) -> list[str]:
    """The feature columns ``params`` name (by default every column that is not a target), checked against the
    file's ``columns`` with the targets."""
    kinds = params.target_kinds()
    _check_columns(list(kinds), columns, path)
    features = params.features if params.features is not None else [c for c in columns if c not in kinds]
    _check_columns(features, columns, path)
    if not features:
        raise DataError(f"table {path} has no feature columns besides the targets")
    return features


def _features(frame: pd.DataFrame, names: Sequence[str], path: Path, offset: int = 0, hint: str = "") -> np.ndarray:
    """The feature columns as float64, or an error naming the first bad column and row (``offset``: the file row
    of the frame's first row, when the frame is one chunk of the file; ``hint`` ends the message of a cell that is
    not a number)."""
    import pandas as pd

    columns = []
    for name in names:
        column = frame[name]
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(values) & column.notna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"table {path}: feature column {name!r} is not numeric "
                f"(row {offset + row}, counting data rows from 0, holds {column.iloc[row]!r}){hint}"
            )
        if not np.isfinite(values).all():
            row = offset + int(np.argmax(~np.isfinite(values)))
            raise DataError(
                f"table {path}: feature column {name!r} has a missing or infinite value at row "
                f"{row} (counting data rows from 0); features must be numeric and complete"
            )
        columns.append(values)
    return np.stack(columns, axis=1) if columns else np.empty((len(frame), 0))


_CATEGORICAL_HINT = "; name the column in suite.params.categorical to read it as categories"


def _is_text(column: pd.Series) -> bool:
    """Whether ``column`` is a column of text: not numeric or boolean, some cell filled, and no cell a number (what
    the ``table`` suite reads as categorical unless ``categorical`` is given)."""
    import pandas as pd
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if is_bool_dtype(column) or is_numeric_dtype(column):
        return False
    column, present = _labelled(column)
    return bool(present.any()) and not pd.to_numeric(column[present], errors="coerce").notna().any()


def categorical_names(params: TableParams, frame: pd.DataFrame, features: Sequence[str]) -> list[str]:
    """The feature columns read as categories, in feature order: those ``params.categorical`` names (checked against
    the features), by default the columns of text."""
    if params.categorical is None:
        return [f for f in features if _is_text(frame[f])]
    outside = [c for c in params.categorical if c not in features]
    if outside:
        raise DataError(f"table {params.path}: categorical column(s) {outside} are not feature columns; features: "
                        f"{', '.join(map(repr, features))}")
    return [f for f in features if f in params.categorical]


def _category_key(value: Any) -> str | None:
    """One cell as the text its category is named by (None: missing): a whole number as an integer (``3`` and
    ``3.0`` are one category, so a column read as floats because of a blank codes like one read as integers),
    another number by ``repr``, a boolean as ``True``/``False``, text as written (blank text is missing)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return repr(v)
        return str(int(v)) if v == round(v) else repr(v)
    text = str(value)
    return text if text.strip() else None


def category_keys(column: pd.Series) -> np.ndarray:
    """The cells of ``column`` as category names (an object array of text, None where missing): each distinct value
    is named once (:func:`_category_key`), then spread back over the rows."""
    import pandas as pd

    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    names = np.array([_category_key(u) for u in uniques] + [None], dtype=object)
    return names[codes]  # the sentinel -1 picks the trailing None


def fit_categories(keys: np.ndarray) -> list[str]:
    """The sorted distinct category names among ``keys`` (the training rows'), missing cells left out."""
    return sorted({k for k in keys if k is not None})


def encode_categories(keys: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """Codes of ``keys`` as float64: 1 + the position in the sorted ``categories``; 0 for a name not among them
    (unseen in training) or a missing cell."""
    index = {c: i + 1 for i, c in enumerate(categories)}
    return np.fromiter((index.get(k, 0) for k in keys), dtype=np.float64, count=len(keys))


def _inputs(frame: pd.DataFrame, features: list[str], categories: dict[str, list[str]], path: Path,
            hint: str = "") -> np.ndarray:
    """The feature columns as float64 in ``features`` order: numbers (``_features``'s checks, ``hint`` ending the
    message of a cell that is not a number), and the codes of the columns in ``categories`` (column -> its fitted
    categories)."""
    numeric = [f for f in features if f not in categories]
    x = np.empty((len(frame), len(features)))
    x[:, [features.index(f) for f in numeric]] = _features(frame, numeric, path, hint=hint)
    for name, fitted in categories.items():
        x[:, features.index(name)] = encode_categories(category_keys(frame[name]), fitted)
    return x


def encode_features(frame: pd.DataFrame, features: Sequence[str], scale: Standardizer | None,
                    path: Path | str, targets: Sequence[str] = (),
                    categories: dict[str, list[str]] | None = None) -> torch.Tensor:
    """New rows as a model trained on this suite reads them: the training feature columns (in any order in
    ``frame``), numeric and complete, standardised with the training split's statistics, as float32; a
    categorical column (``categories``: column -> the categories fitted in training) as its codes, 0 for a value
    training never saw or a missing cell.

    ``frame`` must hold exactly those columns: missing or extra ones are one DataError naming them and
    ``path`` (extra columns that are the run's ``targets`` say so), so a model never reads a column by
    accident."""
    columns = [str(c) for c in frame.columns]
    missing = [c for c in features if c not in columns]
    extra = [c for c in columns if c not in features]
    if missing or extra:
        def names(cs: Sequence[str]) -> str:
            return ", ".join(map(repr, cs[:20])) + (f", ... ({len(cs)} in all)" if len(cs) > 20 else "")

        problems = [f"missing feature column(s) {names(missing)}"] if missing else []
        if extra:
            known = [c for c in extra if c in targets]
            problems.append(f"extra column(s) {names(extra)}"
                            + (f" ({names(known)}: target column(s) of the run; drop them)" if known else ""))
        raise DataError(f"table {path}: {'; '.join(problems)}; the model reads exactly the feature columns "
                        f"{names(list(features))}")
    x = torch.from_numpy(_inputs(frame, list(features), categories or {}, Path(path)))
    return (x if scale is None else scale.encode(x)).float()


def _infer_kind(column: pd.Series, max_classes: int) -> Kind:
    """Non-numeric or boolean -> classification; integer-valued with at most ``max_classes``
    distinct values -> classification; otherwise regression."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if is_bool_dtype(column) or not is_numeric_dtype(column):
        return "classification"
    values = column.dropna().to_numpy(dtype=np.float64)
    if np.all(values == np.round(values)) and len(np.unique(values)) <= max_classes:
        return "classification"
    return "regression"


def _labelled(column: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """The column with blank text cells made missing, and where it holds a label."""
    from pandas.api.types import is_numeric_dtype

    if not is_numeric_dtype(column):
        column = column.mask(column.astype(str).str.strip() == "")
    return column, column.notna().to_numpy()


def _regression_values(column: pd.Series, path: Path, offset: int = 0) -> np.ndarray:
    """A numeric target column as float64 (NaN where missing), or an error naming an infinite row (``offset``:
    the file row of the column's first row)."""
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(values).any():
        row = offset + int(np.argmax(np.isinf(values)))
        raise DataError(f"table {path}: target column {column.name!r} is infinite at row {row}")
    return values


def _class_values(column: pd.Series, present: np.ndarray) -> np.ndarray:
    """The labels of the labelled rows as they are ordered into classes: float64 numbers, or text."""
    from pandas.api.types import is_numeric_dtype

    if is_numeric_dtype(column):
        return column[present].to_numpy(dtype=np.float64)
    return column[present].astype(str).to_numpy(dtype=object)


def _class_names(classes: np.ndarray, column: pd.Series) -> list[Any]:
    """The sorted distinct labels ``classes`` as the user wrote them: bools, ints, floats or text."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if not is_numeric_dtype(column):
        return [str(c) for c in classes]
    if is_bool_dtype(column):
        return [bool(c) for c in classes]
    if np.all(classes == np.round(classes)):
        return [int(c) for c in classes]
    return [float(c) for c in classes]


def _target(
    column: pd.Series, kind: TargetKind, max_classes: int, path: Path
) -> tuple[Kind, np.ndarray, list[Any] | None]:
    """The task kind, float targets (class ids or values, NaN where missing) and class names."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    name = column.name
    column, present = _labelled(column)
    if not present.any():
        raise DataError(f"table {path}: target column {name!r} has no labels")
    if kind == "auto":
        kind = _infer_kind(column, max_classes)
    if kind == "regression":
        if not is_numeric_dtype(column) or is_bool_dtype(column):
            raise DataError(
                f"table {path}: target column {name!r} is not numeric, so it cannot be a "
                "regression target (make it classification)"
            )
        return "regression", _regression_values(column, path), None
    ids = np.full(len(column), np.nan)
    values = _class_values(column, present)
    classes = np.unique(values)
    names = _class_names(classes, column)
    ids[present] = np.searchsorted(classes, values)
    if len(names) < 2:
        raise DataError(
            f"table {path}: target column {name!r} has a single class {names}; a classification "
            "target needs at least 2"
        )
    return "classification", ids, names


def _split_rows(
    n: int, params: TableParams, rng: np.random.Generator, path: Path
) -> list[np.ndarray]:
    """Sorted row ids of train, val and test after a seeded shuffle (each split non-empty)."""
    n_val = max(1, round(params.val_fraction * n))
    n_test = max(1, round(params.test_fraction * n))
    if n - n_val - n_test < 1:
        raise DataError(f"table {path} has {n} rows, too few for a train/val/test split")
    order = rng.permutation(n)
    return [np.sort(part) for part in np.split(order, [n - n_val - n_test, n - n_test])]


def _tasks(labelled: dict[str, tuple[Kind, np.ndarray, list[Any] | None]], train: torch.Tensor,
           params: TableParams) -> tuple[list[Task], dict[str, torch.Tensor]]:
    """The tasks of the target columns (``_target``'s kind, values and class names each) and their float32 targets;
    regression targets standardised with the ``train`` rows' statistics (in float64, before the float32 cast, so
    large values keep their digits)."""
    tasks, targets = [], {}
    for name, (kind, values, names) in labelled.items():
        y = torch.tensor(values, dtype=torch.float64)
        scale = None
        if kind == "regression" and params.standardize_targets:
            scale = Standardizer.fit(y[train])
            y = scale.encode(y)
        metrics = (ACCURACY, AUC) if params.auc and kind == "classification" and len(names or ()) == 2 else ()
        tasks.append(Task(name, kind, len(names) if names else 1, metrics, classes=tuple(names or ()), scale=scale))
        targets[name] = y.float()
    return tasks, targets


def _suite(params: TableParams, features: list[str], tasks: list[Task], targets: dict[str, torch.Tensor],
           rows: list[torch.Tensor], inputs: Sequence[Any], input_scale: Standardizer | None,
           info: dict[str, Any] | None = None, categorical: dict[int, int] | None = None) -> TaskSuite:
    """The suite: one multi-target source per split (``inputs[k]``: the inputs of split k's ``rows[k]``;
    ``categorical``: the columns holding category codes, with their number of codes)."""
    info = {
        "params": params.model_dump(mode="json"),
        "features": features,
        "kinds": {t.name: t.kind for t in tasks},
        **(info or {}),
    }
    splits = {
        split: (TaskData(x, {name: t[r] for name, t in targets.items()}, r),)
        for split, x, r in zip(SPLITS, inputs, rows, strict=True)
    }
    return TaskSuite("table", tuple(tasks), splits, info, input_scale, categorical or {})


def _input_scale(x: torch.Tensor, categorical: Sequence[int]) -> Standardizer:
    """``Standardizer.fit`` of the (training) inputs ``x``, with the identity (mean 0, std 1) on the ``categorical``
    columns: their codes pass through unchanged."""
    fitted = Standardizer.fit(x)
    keep = set(categorical)
    return Standardizer(tuple(0.0 if j in keep else m for j, m in enumerate(fitted.mean)),
                        tuple(1.0 if j in keep else s for j, s in enumerate(fitted.std)))


@SUITES.register(
    "table",
    params=TableParams,
    summary="columns of a CSV/Parquet file as tasks on the other columns (numeric or categorical)",
)
def build(params: TableParams, seed: int) -> TaskSuite:
    """One multi-target source per split; labels of each target column, NaN where blank. With ``stream``, the
    file is read a chunk at a time (:func:`polytask.tasks.suites.table_stream.build_streamed`)."""
    if params.stream:
        from polytask.tasks.suites.table_stream import build_streamed

        return build_streamed(params, seed)
    path = Path(params.path).expanduser()
    frame = read_table(path)
    features = _feature_names(params, list(frame.columns), path)
    rows = [torch.from_numpy(r.astype(np.int64)) for r in
            _split_rows(len(frame), params, np.random.default_rng(seed), path)]
    train = rows[0].numpy()
    categories = {name: fit_categories(category_keys(frame[name].iloc[train]))
                  for name in categorical_names(params, frame, features)}
    x = torch.from_numpy(_inputs(frame, features, categories, path, _CATEGORICAL_HINT))
    labelled = {name: _target(frame[name], requested, params.max_classes, path)
                for name, requested in params.target_kinds().items()}
    tasks, targets = _tasks(labelled, rows[0], params)
    categorical = {features.index(name): len(fitted) + 1 for name, fitted in categories.items()}
    input_scale = _input_scale(x[rows[0]], list(categorical)) if params.standardize else None
    if input_scale is not None:
        x = input_scale.encode(x)
    x = x.float()
    info = {"categories": categories} if categories else None
    return _suite(params, features, tasks, targets, rows, [x[r] for r in rows], input_scale, info, categorical)
