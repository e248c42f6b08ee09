"""The ``table`` suite streamed (``stream: true``): a table larger than memory, read one Parquet row group at a time.

What it holds in memory: the encoded targets (4 bytes per row and target), the row ids of each split (8 bytes per
row) and the fitted maps; never the feature columns. The file is read in passes, a row group at a time:

1. the target columns only: each target's kind and class labels (:class:`_TargetScan`, decided by the same rules as
   the in-memory path, ``table._target``, applied to the column's distinct labels);
2. every column: features checked (numeric and complete, an error naming the file row) and their train-split mean
   and std accumulated in float64 (:class:`_Moments`), targets encoded.

Rows are split by ``table._split_rows`` over the row count, so a streamed suite has exactly the rows, classes and
(to rounding) the standardisation of the in-memory suite of the same file and seed. The inputs of a split are a
:class:`TableRows`, read on demand a row group at a time (the engine's :class:`~polytask.engine.data.ChunkedRows`),
which the engine's :class:`~polytask.engine.data.StreamBatches` serves in a shuffled order that is a pure function
of (seed, epoch, step).

Categorical features are not streamed: ``categorical`` with ``stream: true`` is a ConfigError, and a text feature
column is the numeric reader's error, naming the cell and the in-memory table.

A chunk is a Parquet row group. A CSV/TSV has no random access, so it is first rewritten, once, into a Parquet
cache of the feature and target columns with row groups of ``chunk_rows`` rows (features as float64, targets as
text, parsed as numbers when every labelled cell is one); so is a Parquet file whose row groups exceed
``chunk_rows`` (reading one would hold it whole). The cache lives under ``cache_dir`` (default
``$POLYTASK_CACHE_DIR/tables``), is keyed by the source's path, size, modification time, columns and
``chunk_rows``, is written atomically (a temporary renamed into place, then a JSON sidecar), and is reused by later
runs and resumes.

What it costs: building reads the file twice (the target columns, then everything); each training epoch reads it
once, and each evaluation once more (a split's rows are spread over every row group, so evaluating the validation
split every epoch reads the whole file again; evaluation keeps the split's outputs, a few floats per row). Where it
differs from the in-memory path: the batch order (windows, not one permutation of all rows); the validation batches
of methods that watch validation losses, drawn from a seeded pool of chunks; and two corner cases of pandas'
typing: a Parquet boolean target with missing labels has classes ``False``/``True`` (in memory pandas makes them
the text "False"/"True"), and a CSV target column of booleans with a blank cell keeps its words as written
("true" and "True" are two classes; pandas merges them).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from polytask.errors import ConfigError, DataError
from polytask.io import atomic_write_json, cache_dir, remove_stale_temporaries, temporary_of
from polytask.tasks.suites.table import (
    TableParams,
    TargetKind,
    _class_values,
    _feature_names,
    _features,
    _file_kind,
    _labelled,
    _regression_values,
    _split_rows,
    _suite,
    _target,
    _tasks,
)
from polytask.tasks.task import Kind, Standardizer, TaskSuite

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

CACHE_VERSION = 1
STREAM_HINT = ("; stream: true reads numeric features only (a column of categories needs the in-memory table, "
               "stream: false)")


# ---------------------------------------------------------------- reading a row group


def chunk_features(table: pa.Table, features: list[str] | tuple[str, ...], path: Path | str,
                   offset: int) -> np.ndarray:
    """A row group's feature columns as float64 (rows × features); numeric columns without nulls are read straight
    from Arrow, anything else goes through ``table._features`` (its checks and messages, rows counted from
    ``offset``, the file row of the group's first row)."""
    import pyarrow as pa

    columns = [table.column(f) for f in features]
    if all((pa.types.is_integer(c.type) or pa.types.is_floating(c.type)) and not c.null_count for c in columns):
        x = np.empty((table.num_rows, len(columns)), order="F")  # column by column into place: 4x faster than C order
        for j, c in enumerate(columns):
            x[:, j] = c.to_numpy()
        if np.isfinite(x).all():
            return x
    return _features(table.select(list(features)).to_pandas(), features, Path(path), offset, STREAM_HINT)


_TRUE, _FALSE = {"True", "TRUE", "true"}, {"False", "FALSE", "false"}  # what pandas' CSV reader takes for booleans


def _target_column(column: pa.ChunkedArray, name: str, parse: str | None) -> tuple[pd.Series, str]:
    """Target column ``name`` of a row group as pandas sees it, with its family (``bool``, ``number``, ``text``)
    taken from the file's type (so every row group of a column reads alike): booleans and numbers as float64 with NaN
    where missing (integers past 2**53 rounded, as pandas does), text as text; ``parse`` (``number``, ``bool``): text
    that the CSV cache holds for a column of numbers or booleans."""
    import pandas as pd
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind) \
            or pa.types.is_decimal(kind):
        values = column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        return pd.Series(values, dtype=np.float64, name=name), "bool" if pa.types.is_boolean(kind) else "number"
    text = column.to_pandas().rename(name)
    if parse == "number":
        return pd.to_numeric(text, errors="coerce").astype(np.float64), "number"
    if parse == "bool":
        return text.isin(_TRUE).astype(np.float64), "bool"
    return text, "text"


@dataclass
class _TargetScan:
    """What one pass over a target column learns without holding it: its family, how many rows are labelled, and
    its distinct labels (all of them for a classification column; a column of numbers whose kind is not
    ``classification`` keeps at most ``max_classes`` + 1, enough to tell classes from a regression target)."""

    name: str
    kind: TargetKind
    max_classes: int
    family: str = ""
    labelled: int = 0
    distinct: np.ndarray | None = None

    def add(self, column: pd.Series, family: str) -> None:
        """Take in one row group's ``column`` (of ``family``, as ``_target_column`` read it)."""
        self.family = family
        column, present = _labelled(column)
        self.labelled += int(present.sum())
        capped = self.kind != "classification" and family != "text"
        if capped and self.distinct is not None and len(self.distinct) > self.max_classes:
            return
        values = np.unique(_class_values(column, present))
        merged = values if self.distinct is None else np.unique(np.concatenate([self.distinct, values]))
        self.distinct = merged[:self.max_classes + 1] if capped else merged

    def resolve(self, path: Path) -> tuple[Kind, np.ndarray | None, list[Any] | None]:
        """The column's kind, its sorted class labels as the file holds them (classification) and their names, by
        ``table._target``'s rules on the distinct labels (so its errors too: no labels, one class, text as a
        regression target)."""
        import pandas as pd

        if not self.labelled or self.distinct is None:
            sample = pd.Series([np.nan], name=self.name)
        elif self.family == "bool":
            sample = pd.Series(self.distinct.astype(bool), name=self.name)
        else:
            sample = pd.Series(self.distinct, name=self.name,
                               dtype=np.float64 if self.family == "number" else object)
        kind, _, names = _target(sample, self.kind, self.max_classes, path)
        return kind, (self.distinct if kind == "classification" else None), names


def _encode(column: pd.Series, kind: Kind, classes: np.ndarray | None, path: Path, offset: int) -> np.ndarray:
    """A row group's targets as float64: class ids among ``classes`` or values, NaN where missing."""
    column, present = _labelled(column)
    if kind == "regression":
        return _regression_values(column, path, offset)
    ids = np.full(len(column), np.nan)
    ids[present] = np.searchsorted(classes, _class_values(column, present))  # type: ignore[arg-type]
    return ids


@dataclass
class _Moments:
    """Per column: rows, mean and sum of squared deviations, merged a chunk at a time (Chan, Golub & LeVeque 1979,
    "Updating formulae and a pairwise algorithm for computing sample variances"): ``Standardizer.fit`` of rows that
    are never all in memory, in float64."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def zeros(cls, columns: int) -> _Moments:
        """No rows yet, ``columns`` columns."""
        return cls(0, np.zeros(columns), np.zeros(columns))

    def add(self, values: np.ndarray) -> None:
        """Merge the rows of ``values`` (rows × columns, float64, complete) into the totals."""
        if not len(values):
            return
        k, mean = len(values), values.mean(0)
        m2 = ((values - mean) ** 2).sum(0)
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * k / total)
        self.n = total

    def standardizer(self) -> Standardizer:
        """Mean and population std (std 0 -> 1, as ``Standardizer.fit``); the identity without rows."""
        if not self.n:
            return Standardizer((0.0,) * len(self.mean), (1.0,) * len(self.mean))
        std = np.sqrt(self.m2 / self.n)
        return Standardizer(tuple(self.mean.tolist()), tuple(np.where(std > 0, std, 1.0).tolist()))


# ---------------------------------------------------------------- the inputs of one split


@dataclass(frozen=True, eq=False)
class TableRows:
    """The inputs of one split of a streamed table: its ``rows`` (sorted file rows) of the Parquet file ``path``,
    the ``features`` columns standardised with ``scale`` as float32 on ``device``, read a row group at a time.

    It implements the engine's ``ChunkedRows`` (chunk ``c``: this split's rows of row group ``c``; ``starts``: the
    first file row of each row group, then the row count) and reads like a tensor of shape (rows, features):
    ``x[i:j]``, ``x[index tensor]``, ``x[mask]`` read the row groups they need, keeping the last one (evaluation
    reads a split in order, one row group at a time). ``digest`` is of the file's feature values, so a cache key
    over this object sees the data, not only the file's name."""

    path: str
    digest: str
    features: tuple[str, ...]
    rows: np.ndarray
    starts: tuple[int, ...]
    scale: Standardizer | None
    shuffle_rows: int = 262144
    device: str = "cpu"

    def __post_init__(self) -> None:
        # this split's position of each row group's first row, then its row count
        object.__setattr__(self, "_bounds", np.searchsorted(self.rows, self.starts))
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_file", None)
        object.__setattr__(self, "_last", (-1, None))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"TableRows({self.path!r}, rows={len(self)}, features={len(self.features)}, device={self.device!r})"

    @property
    def shape(self) -> torch.Size:
        """(rows, features), as the tensor of these inputs would have."""
        return torch.Size((len(self.rows), len(self.features)))

    @property
    def dtype(self) -> torch.dtype:
        """float32, what the rows are read as."""
        return torch.float32

    @property
    def ndim(self) -> int:
        """2: rows × features."""
        return 2

    def to(self, device: torch.device | str) -> TableRows:
        """The same rows, read onto ``device``."""
        return self if str(torch.device(device)) == self.device else replace(self, device=str(torch.device(device)))

    def chunk_sizes(self) -> list[int]:
        """This split's rows in each row group of the file, in file order."""
        return np.diff(self._bounds).tolist()

    def chunk(self, index: int) -> Tensor:
        """This split's rows of row group ``index``, standardised, float32, on the device."""
        import pyarrow.parquet as pq

        with self._lock:  # type: ignore[attr-defined]
            if self._file is None:  # type: ignore[attr-defined]
                object.__setattr__(self, "_file", pq.ParquetFile(self.path))
            # one thread: reads run beside training (read-ahead), which needs the other cores
            table = self._file.read_row_group(  # type: ignore[attr-defined]
                index, columns=list(self.features), use_threads=False)
        local = self.rows[self._bounds[index]:self._bounds[index + 1]] - self.starts[index]
        x = torch.from_numpy(np.ascontiguousarray(chunk_features(table, self.features, self.path,
                                                                 self.starts[index])[local]))
        if self.scale is not None:
            x = self.scale.encode(x)  # in float64, then float32: the in-memory path's order
        return x.float().to(self.device)

    def _cached(self, index: int) -> Tensor:
        last, x = self._last  # type: ignore[attr-defined]
        if last != index:
            x = self.chunk(index)
            object.__setattr__(self, "_last", (index, x))
        return x

    def __getitem__(self, key: Any) -> Tensor:
        n = len(self)
        if isinstance(key, int):
            return self[torch.tensor([key])][0]
        if isinstance(key, slice):
            positions = np.arange(*key.indices(n))
        else:
            key = np.asarray(key.cpu() if isinstance(key, Tensor) else key)
            positions = np.flatnonzero(key) if key.dtype == bool else np.where(key < 0, key + n, key).reshape(-1)
            if len(positions) and (positions.min() < 0 or positions.max() >= n):
                raise IndexError(f"row index out of range for {n} rows")
        out = torch.empty((len(positions), len(self.features)), dtype=torch.float32, device=self.device)
        groups = np.searchsorted(self._bounds, positions, side="right") - 1
        for g in np.unique(groups):
            at = np.flatnonzero(groups == g)
            out[torch.from_numpy(at).to(self.device)] = self._cached(int(g))[
                torch.from_numpy(positions[at] - self._bounds[g]).to(self.device)]
        return out


# ---------------------------------------------------------------- the Parquet file to stream


def _columns(path: Path) -> list[str]:
    """The column names of a CSV/TSV (its header) or Parquet file (its schema)."""
    try:
        if _file_kind(path) in (".csv", ".tsv"):
            import pandas as pd

            return [str(c) for c in pd.read_csv(path, sep="\t" if _file_kind(path) == ".tsv" else ",", nrows=0).columns]
        if _file_kind(path) in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            schema = pq.ParquetFile(path).schema_arrow
            index = [c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
            return [str(c) for c in schema.names if c not in index]  # a saved pandas index is no column
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read table {path}: {e}") from None
    raise DataError(f"table {path}: unknown file type {_file_kind(path)!r}; use .csv, .tsv or .parquet")


def _cache_of(path: Path, columns: list[str], params: TableParams) -> Path:
    """Where the Parquet cache of ``path``'s ``columns`` goes, named by what makes it valid."""
    st = path.stat()
    key = json.dumps([CACHE_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns, columns, params.chunk_rows])
    root = Path(params.cache_dir).expanduser() if params.cache_dir else cache_dir() / "tables"
    return root / f"{path.name.split('.')[0]}-{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}.parquet"


def _text_kind(text: pd.Series) -> set[str]:
    """What a chunk of a CSV column read as text could be, as pandas would read the whole column: ``number`` when
    every labelled cell is a number, ``bool`` when every cell is a boolean word and none is missing."""
    import pandas as pd

    missing = text.isna()
    kinds = set()
    if (pd.to_numeric(text, errors="coerce").notna() | missing).all():
        kinds.add("number")
    if not missing.any() and text.isin(_TRUE | _FALSE).all():
        kinds.add("bool")
    return kinds


def _write_cache(path: Path, features: list[str], targets: list[str], params: TableParams,
                 out: Path) -> dict[str, str]:
    """Rewrite ``path``'s feature and target columns into the Parquet file ``out`` with row groups of at most
    ``chunk_rows`` rows, atomically; returns the targets held as text that are numbers or booleans (a CSV's)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    tmp = temporary_of(out)
    parse = {t: {"number", "bool"} for t in targets}
    try:
        with open(tmp, "wb") as f:
            if _file_kind(path) in (".parquet", ".pq"):
                source = pq.ParquetFile(path)
                with pq.ParquetWriter(f, source.schema_arrow.empty_table().select([*features, *targets]).schema) as w:
                    for batch in source.iter_batches(batch_size=params.chunk_rows, columns=[*features, *targets]):
                        w.write_table(pa.Table.from_batches([batch]), row_group_size=params.chunk_rows)
                parse = {}
            else:
                schema = pa.schema([(c, pa.float64()) for c in features] + [(t, pa.string()) for t in targets])
                reader = pd.read_csv(path, sep="\t" if _file_kind(path) == ".tsv" else ",",
                                     chunksize=params.chunk_rows, usecols=[*features, *targets],
                                     dtype=dict.fromkeys(targets, str))
                offset = 0
                with pq.ParquetWriter(f, schema) as w:
                    for frame in reader:
                        x = _features(frame, features, path, offset, STREAM_HINT)
                        arrays = [pa.array(x[:, j]) for j in range(len(features))]
                        for t in targets:
                            text = frame[t]
                            parse[t] &= _text_kind(text)
                            arrays.append(pa.array(text.astype(object).where(text.notna(), None), pa.string()))
                        w.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=params.chunk_rows)
                        offset += len(frame)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read table {path} into the stream cache {out}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    parsed = {t: min(kinds) for t, kinds in parse.items() if kinds}  # (no cell is both)
    atomic_write_json(out.with_suffix(".json"), {"source": str(path), "parse": parsed})
    return parsed


def stream_source(path: Path, features: list[str], targets: list[str],
                  params: TableParams) -> tuple[Path, dict[str, str]]:
    """The Parquet file to stream ``path`` from (itself, when its row groups hold at most ``chunk_rows`` rows; else
    its cache, written if missing) and the target columns that file holds as text but are numbers or booleans."""
    if _file_kind(path) in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        if max((meta.row_group(g).num_rows for g in range(meta.num_row_groups)), default=0) <= params.chunk_rows:
            return path, {}
    out = _cache_of(path, [*features, *targets], params)
    sidecar = out.with_suffix(".json")
    if out.is_file() and sidecar.is_file():
        return out, json.loads(sidecar.read_text())["parse"]
    return out, _write_cache(path, features, targets, params, out)


# ---------------------------------------------------------------- the suite


def build_streamed(params: TableParams, seed: int) -> TaskSuite:
    """The ``table`` suite of ``params`` with inputs streamed from disk (see the module docstring)."""
    import pyarrow.parquet as pq

    if params.categorical:
        raise ConfigError(f"suite.params.categorical: stream: true reads numeric features only, so categorical "
                          f"columns {params.categorical} need the in-memory table (stream: false)")
    path = Path(params.path).expanduser()
    if not path.is_file():
        raise DataError(f"table {path} does not exist")
    features = _feature_names(params, _columns(path), path)
    kinds = params.target_kinds()
    targets = list(kinds)
    source, parse = stream_source(path, features, targets, params)
    file = pq.ParquetFile(source)
    groups = file.metadata.num_row_groups
    starts = [0, *np.cumsum([file.metadata.row_group(g).num_rows for g in range(groups)]).tolist()]
    n = starts[-1]

    scans = {t: _TargetScan(t, k, params.max_classes) for t, k in kinds.items()}
    for g in range(groups):
        table = file.read_row_group(g, columns=targets)
        for t in targets:
            scans[t].add(*_target_column(table.column(t), t, parse.get(t)))
    resolved = {t: scans[t].resolve(path) for t in targets}

    rows = _split_rows(n, params, np.random.default_rng(seed), path)
    train = np.zeros(n, dtype=bool)
    train[rows[0]] = True
    moments = _Moments.zeros(len(features))
    digest = hashlib.blake2b(json.dumps(features).encode(), digest_size=16)
    values = {t: np.empty(n) for t in targets}
    for g in range(groups):
        lo, hi = starts[g], starts[g + 1]
        table = file.read_row_group(g, columns=list(dict.fromkeys([*features, *targets])))
        x = chunk_features(table, features, path, lo)
        moments.add(x[train[lo:hi]])
        digest.update(np.ascontiguousarray(x.T).data)  # column by column (x is in Fortran order: no copy)
        for t in targets:
            kind, classes, _ = resolved[t]
            values[t][lo:hi] = _encode(_target_column(table.column(t), t, parse.get(t))[0], kind, classes, path, lo)
        del table, x

    split_rows = [torch.from_numpy(r.astype(np.int64, copy=False)) for r in rows]
    del rows, train
    tasks, encoded = _tasks({t: (resolved[t][0], values.pop(t), resolved[t][2]) for t in targets}, split_rows[0],
                            params)
    input_scale = moments.standardizer() if params.standardize else None
    inputs = [TableRows(str(source), digest.hexdigest(), tuple(features), r.numpy(), tuple(starts), input_scale,
                        params.shuffle_rows) for r in split_rows]
    return _suite(params, features, tasks, encoded, split_rows, inputs, input_scale,
                  {"stream": {"source": str(source), "row_groups": groups}})
