"""Batch order as a pure function of (seed, epoch, step): resuming needs only the data position.

A batch source gives the loop its steps (:class:`Batch`: the sources and the rows of each) and the splits it
evaluates on; :class:`TensorBatches` is the in-memory one, :class:`DatasetBatches` reads torch ``Dataset``s and
``DataLoader``s (map-style or iterable), :class:`StreamBatches` reads inputs larger than memory a chunk at a time
(:class:`ChunkedRows`, e.g. a streamed table); :func:`batch_source` picks between the first and the last.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from polytask.errors import DataError
from polytask.tasks.task import Task, TaskData

_LOCAL = threading.local()  # per thread: a generator reseeded by every draw (none made per call), step_rows' blocks


_M32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED  # numpy's SeedSequence constants
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715


def _hash_constants(n: int, table: Sequence[int] = (_INIT_A,)) -> list[int]:
    """The first ``n`` (at least) values of SeedSequence's hash constant, which its t-th hashing step xors in (then
    multiplies by the (t+1)-th): ``table`` and as many more as it lacks (a new list: the module's table is only read,
    from any thread)."""
    out = list(table)
    while len(out) < n:
        out.append(out[-1] * _MULT_A & _M32)
    return out


_HASH_A = _hash_constants(64)  # enough for keys of up to 15 32-bit words; a longer key extends a copy
_B0 = _INIT_B
_B1 = _B0 * _MULT_B & _M32
_B2 = _B1 * _MULT_B & _M32


def key_seed(key: Sequence[int]) -> int:
    """A 63-bit seed that depends only on the non-negative integers of ``key``:
    ``np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1``, computed here in Python (the same number,
    checked against numpy in the tests), its hash constants tabulated and its steps inlined: numpy's object costs
    0.1-0.2 ms when its code is cold, as it is once per epoch in the loop; this about 5 us (timeit, 4 words), for a
    replay strategy's draw at every step."""
    words: list[int] = []  # every integer as 32-bit words, low first (0 is one word), as SeedSequence reads it
    for k in key:
        k = int(k)
        if k < 0:
            raise ValueError(f"key_seed: {k} is negative")
        words.append(k & _M32)
        while k := k >> 32:
            words.append(k & _M32)
    need = 18 + 4 * max(0, len(words) - 4)  # one per hashing step, and the last one's multiplier
    h = _HASH_A if need <= len(_HASH_A) else _hash_constants(need, _HASH_A)
    m, lo, hi = _M32, _MIX_L, _MIX_R
    pool = []
    for t in range(4):  # the entropy's first four words hashed into the pool
        v = ((words[t] if t < len(words) else 0) ^ h[t]) * h[t + 1] & m
        pool.append(v ^ v >> 16)
    t = 4
    for i in range(4):  # every pool word mixed into every other: mix(pool[j], hashmix(pool[i]))
        src = pool[i]
        for j in range(4):
            if j != i:
                v = (src ^ h[t]) * h[t + 1] & m
                t += 1
                r = (lo * pool[j] - hi * (v ^ v >> 16)) & m
                pool[j] = r ^ r >> 16
    for w in words[4:]:  # the rest of the entropy mixed into every pool word
        for j in range(4):
            v = (w ^ h[t]) * h[t + 1] & m
            t += 1
            r = (lo * pool[j] - hi * (v ^ v >> 16)) & m
            pool[j] = r ^ r >> 16
    a = (pool[0] ^ _B0) * _B1 & m  # the state's two 32-bit words, hashed with the output constants, low word first
    b = (pool[1] ^ _B1) * _B2 & m
    return ((a ^ a >> 16) | (b ^ b >> 16) << 32) >> 1


def _generator(seed: int) -> torch.Generator:
    """This thread's generator, seeded with ``seed``."""
    gen = getattr(_LOCAL, "generator", None)
    if gen is None:
        gen = _LOCAL.generator = torch.Generator()
    return gen.manual_seed(seed)


def permutation(n: int, *key: int) -> Tensor:
    """A random permutation of range(n) that depends only on the integers in ``key``."""
    return torch.randperm(n, generator=_generator(key_seed(key)))


_BLOCK_STEPS = 32  # steps whose keys ``step_rows`` draws at once
_BLOCK_KEYS = 1 << 21  # random keys a block draws at most (16 MiB): a block has fewer steps when there are more rows
_ROWS_SALT = 0x524F5753  # keeps step_rows' seeds apart from permutation's for the same key
_BLOCKS_KEPT = 16  # blocks kept per thread (one per caller and key: replay draws one a step, DER++ two)


def step_rows(n_rows: int, n: int, step: int, *key: int) -> Tensor:
    """``min(n, n_rows)`` of ``range(n_rows)`` drawn without replacement, in random order, for step ``step``: a pure
    function of ``(n_rows, n, step, key)``, so a resumed run draws the same rows (read-only: the tensor may be shared).

    A step's rows are the ``n`` smallest of the first ``n_rows`` of its uniform float64 keys, in the keys' order (a
    uniform sample without replacement in uniform order; two equal keys have probability about ``n_rows**2 / 2**54``).
    The keys of a block of steps (32; fewer past 65,536 rows) are drawn at once, ``width`` (``n_rows`` rounded up to
    a power of two) a step, from one generator seeded by ``key_seed`` of (key, block, width), and kept per thread: a
    growing buffer (rows stored as steps train) reads the same keys until it doubles. A step takes the smallest keys
    of its own row; once a second step of the block asks for the same ``(n_rows, n)``, those of every row are taken
    at once, and the block's other steps cost a lookup. A per-step :func:`permutation` (a hash, a reseed, a randperm
    and a slice) cost about 40 us inside the training loop, at every step of a replay strategy (split-digits, 200
    rows)."""
    width = 1 << (n_rows - 1).bit_length() if n_rows > 1 else 1
    block_steps = max(1, min(_BLOCK_STEPS, _BLOCK_KEYS // width))
    block, i = divmod(step, block_steps)
    cache = getattr(_LOCAL, "blocks", None)
    if cache is None:
        cache = _LOCAL.blocks = {}
    tag = (width, block, *key)
    entry = cache.get(tag)
    if entry is None:  # [the block's keys, the (n_rows, n) last asked for, every step's rows for it]
        entry = cache[tag] = [torch.rand(block_steps, width, dtype=torch.float64, generator=_generator(
            key_seed((*key, block, width, _ROWS_SALT)))), None, None]
        if len(cache) > _BLOCKS_KEPT:
            del cache[next(iter(cache))]
    keys, asked, rows = entry
    k = min(n, n_rows)
    if asked == (n_rows, n):
        if rows is None:
            rows = entry[2] = keys[:, :n_rows].topk(k, dim=1, largest=False).indices.unbind(0)
        return rows[i]
    entry[1], entry[2] = (n_rows, n), None
    return keys[i, :n_rows].topk(k, largest=False).indices


_VAL = 7919  # key of the validation batches' draws


def validation_batch(val: Sequence[TaskData], batch_size: int, seed: int, global_step: int,
                     device: torch.device | None = None) -> Batch:
    """The validation batch of step ``global_step``: ``batch_size`` rows of each source drawn by ``(seed,
    global_step)`` (:func:`step_rows`), their indices on ``device`` when given (for methods that watch validation
    losses, CoBa)."""
    rows = [step_rows(len(s), batch_size, global_step, seed, _VAL) for s in val]
    return Batch(val, rows if device is None else [r.to(device) for r in rows])


def steps_per_epoch(sizes: list[int], batch_size: int) -> int:
    """An epoch is one pass over the largest source."""
    return max(math.ceil(n / batch_size) for n in sizes)


def epoch_batches(sizes: list[int], batch_size: int, seed: int, epoch: int) -> list[list[Tensor]]:
    """Row indices of every step of ``epoch``: ``batches[step][source]``.

    The largest source is seen once in a fresh random order (last batch partial); smaller sources of a
    multi-input suite cycle through fresh permutations so every step has a batch of each.
    """
    steps = steps_per_epoch(sizes, batch_size)
    per_source = []
    for s, n in enumerate(sizes):
        if math.ceil(n / batch_size) == steps:
            stream = permutation(n, seed, epoch, s, 0)
        else:
            cycles = math.ceil(steps * batch_size / n)
            stream = torch.cat([permutation(n, seed, epoch, s, c) for c in range(cycles)])[:steps * batch_size]
        per_source.append(stream.split(batch_size))  # views, the last one partial
    return [list(b) for b in zip(*per_source, strict=True)]


@dataclass(frozen=True)
class Batch:
    """One step's data: the sources (``TaskData``) and, per source, the indices of the step's rows."""

    sources: Sequence[TaskData]
    rows: Sequence[Tensor]


class BatchSource(Protocol):
    """What the loop trains and evaluates on. ``epoch(seed, epoch)[step]`` must be a pure function of its
    arguments (that is what makes resuming exact); ``val_batch`` is the validation batch of a global step, for
    methods that watch validation losses."""

    def to(self, device: torch.device) -> BatchSource:
        """The same source with its data on ``device``."""

    def steps_per_epoch(self) -> int:
        """Optimiser steps (batches) in one training epoch."""

    def epoch(self, seed: int, epoch: int) -> Sequence[Batch]:
        """The training batches of epoch ``epoch``, a pure function of ``(seed, epoch)``: a resumed job reads the
        same batches from the step it stopped at."""

    def val_batch(self, seed: int, global_step: int) -> Batch:
        """The validation batch of step ``global_step`` (a pure function of its arguments), for methods that watch
        validation losses (CoBa)."""

    def split(self, name: str) -> Sequence[TaskData]:
        """The whole split ``name`` (``train``, ``val`` or ``test``) as its sources, for evaluation."""


@dataclass(frozen=True)
class TensorBatches:
    """In-memory splits (``train``, ``val``, ``test``, each a sequence of sources) served in batches of
    ``batch_size`` (:func:`epoch_batches`)."""

    splits: Mapping[str, Sequence[TaskData]]
    batch_size: int

    def __post_init__(self) -> None:
        missing = [s for s in ("train", "val", "test") if s not in self.splits]
        if missing:
            raise DataError(f"batch source: split(s) {missing} missing (have {sorted(self.splits)})")

    def to(self, device: torch.device) -> TensorBatches:
        """The same splits with every source moved to ``device`` (this source itself when all are there)."""
        moved = {s: [d.to(device) for d in srcs] for s, srcs in self.splits.items()}
        if all(a is b for s, srcs in self.splits.items() for a, b in zip(srcs, moved[s], strict=True)):
            return self
        return TensorBatches(moved, self.batch_size)

    def _sizes(self) -> list[int]:
        return [len(s) for s in self.splits["train"]]

    def steps_per_epoch(self) -> int:
        """Batches per epoch: one pass over the largest training source (smaller ones cycle)."""
        return steps_per_epoch(self._sizes(), self.batch_size)

    def epoch(self, seed: int, epoch: int) -> list[Batch]:
        """The training batches of ``epoch``: :func:`epoch_batches`, a pure function of ``(seed, epoch)``."""
        train = self.splits["train"]
        return [Batch(train, rows) for rows in epoch_batches(self._sizes(), self.batch_size, seed, epoch)]

    def val_batch(self, seed: int, global_step: int) -> Batch:
        """``batch_size`` validation rows per source drawn by ``(seed, global_step)`` (for CoBa)."""
        return validation_batch(self.splits["val"], self.batch_size, seed, global_step)

    def split(self, name: str) -> Sequence[TaskData]:
        """The sources of split ``name``."""
        return self.splits[name]


# ---------------------------------------------------------------- torch Datasets and DataLoaders


def _label(value: Any, task: Task) -> Tensor:
    """One row's target of ``task`` as a float tensor, NaN where it is missing (None or NaN)."""
    shape = () if task.kind == "classification" or task.n_outputs == 1 else (task.n_outputs,)
    if value is None:
        return torch.full(shape, float("nan"))
    return torch.as_tensor(value, dtype=torch.float32).reshape(shape)


class _Stream:
    """One Dataset (map-style or iterable) with the tasks it labels and how its rows are collated."""

    def __init__(self, data: Any, tasks: Sequence[Task], only: str | None, where: str) -> None:
        loader = data if isinstance(data, DataLoader) else None
        self.dataset = data.dataset if loader is not None else data
        # a loader without batching (batch_size=None) converts rows one by one; polytask batches them itself
        self.collate = loader.collate_fn if loader is not None and loader.batch_size is not None else default_collate
        self.loader_batch = loader.batch_size if loader is not None else None
        self.tasks, self.only, self.where = list(tasks), only, where
        self.iterable = isinstance(self.dataset, IterableDataset)
        if not self.iterable and not hasattr(self.dataset, "__len__"):
            raise DataError(f"{where}: a map-style Dataset needs __len__ ({type(self.dataset).__name__} has none)")

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, item: Any) -> tuple[Any, dict[str, Tensor]]:
        """``(x, {task: y})`` (or ``(x, y)`` for a source of one task), every task's label filled (NaN: missing)."""
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{self.where}: an item must be (x, {{task: y}}) or (x, y), got {type(item).__name__}")
        x, y = item
        if self.only is not None:  # a source of one task: (x, y), or (x, {task: y}) read for that task only
            y = {self.only: y.get(self.only) if isinstance(y, Mapping) else y}
        if not isinstance(y, Mapping):
            raise DataError(f"{self.where}: the targets of a multi-task source must be a dict task -> label, "
                            f"got {type(y).__name__} (one source per task takes (x, y))")
        unknown = sorted(set(y) - {t.name for t in self.tasks})
        if unknown:
            raise DataError(f"{self.where}: label(s) for unknown task(s) {unknown}; tasks are "
                            f"{[t.name for t in self.tasks]}")
        try:
            return x, {t.name: _label(y.get(t.name), t) for t in self.tasks if self.only in (None, t.name)}
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{self.where}: a label is not a number or {'{task: label}'} ({e})") from None

    def batch(self, items: Sequence[Any]) -> TaskData:
        x, y = self.collate([self.row(i) for i in items])
        if not isinstance(x, Tensor):
            raise DataError(f"{self.where}: inputs must collate to one tensor, got {type(x).__name__}")
        return TaskData(x, {k: v.float() for k, v in y.items()})

    def rows(self, indices: Tensor) -> TaskData:
        return self.batch([self.dataset[int(i)] for i in indices])

    def all(self, batch_size: int) -> TaskData:
        """The whole source as one TaskData (evaluation splits), read in batches."""
        if self.iterable:
            items = list(iter(self.dataset))
            parts = [self.batch(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
        else:
            parts = [self.rows(torch.arange(i, min(i + batch_size, len(self))))
                     for i in range(0, len(self), batch_size)]
        if not parts:
            raise DataError(f"{self.where}: the source is empty")
        return TaskData(torch.cat([p.x for p in parts]), {k: torch.cat([p.y[k] for p in parts]) for k in parts[0].y})


class _Lazy(Sequence):
    """The batches of one epoch, fetched only when the loop asks for them."""

    def __init__(self, n: int, fetch: Callable[[int], Batch]) -> None:
        self.n, self.fetch = n, fetch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, step: int | slice) -> Any:  # type: ignore[override]
        if isinstance(step, slice):  # consecutive batches (gradient accumulation)
            return [self.fetch(i) for i in range(*step.indices(self.n))]
        if not 0 <= step < self.n:
            raise IndexError(step)
        return self.fetch(step)


class DatasetBatches:
    """Torch ``Dataset``s or ``DataLoader``s as a batch source: ``train``/``val``/``test`` each one multi-task
    source yielding ``(x, {task: y})`` or a dict task -> source yielding ``(x, y)``; a missing or NaN label
    masks that row for that task.

    Map-style data: the rows of step ``s`` of epoch ``e`` are :func:`epoch_batches` of the sources' lengths, a
    pure function of (seed, e, s); rows are read with ``dataset[i]`` and collated with the loader's
    ``collate_fn`` (a loader's sampler, shuffling and workers are not used: polytask owns the order, so a
    resumed run reads exactly the batches it would have read; rows are read in the training process).
    Iterable data: each epoch iterates the dataset afresh and cuts the stream into batches of ``batch_size``;
    an epoch is ``steps`` batches (required when the dataset has no length); a resumed epoch iterates again and
    skips the batches already trained, so resuming is exact when iterating the dataset again yields the same
    stream. Validation and test splits are read into memory once, for evaluation.
    """

    def __init__(self, tasks: Sequence[Task], train: Any, val: Any, test: Any | None = None,
                 batch_size: int | None = None, steps: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.tasks, self.device = list(tasks), torch.device(device)
        self._inputs = (train, val, test, batch_size, steps)
        self.streams = {name: self._streams(data, name) for name, data in
                        (("train", train), ("val", val), ("test", test if test is not None else val))}
        sizes = [s.loader_batch for s in self.streams["train"] if s.loader_batch]
        self.batch_size = int(batch_size or (sizes[0] if sizes else 0) or 64)
        self.iterable = any(s.iterable for s in self.streams["train"])
        if isinstance(train, Mapping) and set(train) != {t.name for t in self.tasks}:
            raise DataError(f"train: one source per task needs a source for every task; task(s) "
                            f"{sorted({t.name for t in self.tasks} - set(train))} have none")
        if self.iterable and len(self.streams["train"]) > 1:
            raise DataError("train: one iterable source only (give one multi-task IterableDataset)")
        self.steps = steps
        if self.iterable and steps is None:
            try:
                self.steps = math.ceil(len(self.streams["train"][0]) / self.batch_size)
            except TypeError:
                raise DataError("train: an IterableDataset without __len__ needs steps (batches per epoch)") from None
        self._splits: dict[str, list[TaskData]] = {}

    def _streams(self, data: Any, split: str) -> list[_Stream]:
        if isinstance(data, Mapping):
            names = {t.name for t in self.tasks}
            for key in data:
                if key not in names:
                    raise DataError(f"{split}: source for unknown task {key!r}; tasks are {sorted(names)}")
            return [_Stream(d, self.tasks, k, f"{split}[{k!r}]") for k, d in data.items()]
        return [_Stream(data, self.tasks, None, split)]

    def to(self, device: torch.device) -> DatasetBatches:
        """The same datasets, with batches moved to ``device`` as they are read."""
        train, val, test, batch_size, steps = self._inputs
        return DatasetBatches(self.tasks, train, val, test, batch_size, steps, device)

    def steps_per_epoch(self) -> int:
        """Batches per epoch: ``steps`` for iterable data, else one pass over the largest training source."""
        if self.iterable:
            return int(self.steps)  # type: ignore[arg-type]
        return steps_per_epoch([len(s) for s in self.streams["train"]], self.batch_size)

    def epoch(self, seed: int, epoch: int) -> Sequence[Batch]:
        """The training batches of ``epoch``, read when indexed: map-style data in the order of
        :func:`epoch_batches` (a pure function of ``(seed, epoch)``), iterable data in stream order, forwards only."""
        streams, n = self.streams["train"], self.steps_per_epoch()
        if self.iterable:
            return _Lazy(n, self._iterated(streams[0], n))
        order = epoch_batches([len(s) for s in streams], self.batch_size, seed, epoch)

        def fetch(step: int) -> Batch:
            data = [s.rows(r).to(self.device) for s, r in zip(streams, order[step], strict=True)]
            return Batch(data, [torch.arange(len(d), device=self.device) for d in data])
        return _Lazy(n, fetch)

    def _iterated(self, stream: _Stream, n: int) -> Callable[[int], Batch]:
        it, pos = iter(stream.dataset), [0]

        def fetch(step: int) -> Batch:
            if step < pos[0]:
                raise DataError("train: an iterable source is read forwards only")
            while True:
                items = [item for _, item in zip(range(self.batch_size), it, strict=False)]
                pos[0] += 1
                if not items:
                    raise DataError(f"train: the iterable source ended after {pos[0] - 1} of {n} batches")
                if pos[0] - 1 == step:
                    data = stream.batch(items).to(self.device)
                    return Batch([data], [torch.arange(len(data), device=self.device)])
        return fetch

    def split(self, name: str) -> Sequence[TaskData]:
        """The whole split ``name``, read into memory on first use and kept (for evaluation)."""
        if name not in self._splits:
            self._splits[name] = [s.all(self.batch_size).to(self.device) for s in self.streams[name]]
        return self._splits[name]

    def val_batch(self, seed: int, global_step: int) -> Batch:
        """``batch_size`` validation rows per source drawn by ``(seed, global_step)`` (for CoBa)."""
        return validation_batch(self.split("val"), self.batch_size, seed, global_step, self.device)


# ---------------------------------------------------------------- inputs read from storage in chunks

_STREAM = 6151  # key of the streamed epochs' permutations (_VAL keys validation batches)


@runtime_checkable
class ChunkedRows(Protocol):
    """Inputs larger than memory, read from storage a chunk at a time (a streamed table: the rows of one split in
    one Parquet row group). The chunks hold the source's rows in order; ``chunk(c)`` reads chunk ``c``'s inputs on
    the source's device; indexing (``x[i:j]``, ``x[rows]``) reads the chunks it needs. ``shuffle_rows`` is how many
    rows a streamed epoch shuffles together."""

    shuffle_rows: int

    def __len__(self) -> int: ...

    def chunk_sizes(self) -> Sequence[int]: ...

    def chunk(self, index: int) -> Tensor: ...


def stream_windows(sizes: Sequence[int], rows: int, seed: int, epoch: int) -> list[list[int]]:
    """The chunks of each shuffling window of ``epoch``: the non-empty chunks in an order drawn from (seed, epoch),
    cut into consecutive windows of at least ``rows`` rows (the last may hold fewer)."""
    windows: list[list[int]] = [[]]
    filled = 0
    for c in permutation(len(sizes), seed, epoch, _STREAM).tolist():
        if not sizes[c]:
            continue
        if filled >= rows:
            windows.append([])
            filled = 0
        windows[-1].append(c)
        filled += sizes[c]
    return windows if windows[0] else []


def _window(source: TaskData, chunks: Sequence[int], firsts: Sequence[int], key: Sequence[int]) -> TaskData:
    """The rows of ``chunks`` (``firsts[c]``: the source position of chunk c's first row) in the order of
    ``permutation(n, *key)``, inputs read chunk by chunk into place (no second copy of the window)."""
    spans = [torch.arange(firsts[c], firsts[c + 1]) for c in chunks]
    n = sum(len(s) for s in spans)
    perm = permutation(n, *key)
    positions = torch.cat(spans)[perm]
    into = torch.empty_like(perm)
    into[perm] = torch.arange(n)
    x: Tensor | None = None
    at = 0
    for c in chunks:
        part = source.x.chunk(c)
        if x is None:
            x = part.new_empty((n, *part.shape[1:]))
        x.index_copy_(0, into[at:at + len(part)].to(part.device), part)
        at += len(part)
    assert x is not None and at == n
    on = positions.to(next(iter(source.y.values())).device) if source.y else positions
    return TaskData(x, {k: v[on] for k, v in source.y.items()},
                    None if source.index is None else source.index[positions])


def _rows(data: TaskData, start: int, stop: int) -> TaskData:
    """Rows ``start:stop`` of ``data``, as views."""
    return TaskData(data.x[start:stop], {k: v[start:stop] for k, v in data.y.items()},
                    None if data.index is None else data.index[start:stop])


_READER: ThreadPoolExecutor | None = None  # one reading thread for every streamed source (jobs train one at a time)


class _Ready:
    """A value computed in the calling thread, read like a Future's."""

    def __init__(self, value: TaskData) -> None:
        self.value = value

    def result(self) -> TaskData:
        return self.value


class StreamBatches:
    """A training split too large for memory (one source whose inputs are :class:`ChunkedRows`) served in batches of
    ``batch_size``; ``val`` and ``test`` may be chunked or in memory.

    Epoch ``e`` visits the chunks in an order drawn from (seed, e) and cuts them into windows of at least
    ``shuffle_rows`` rows (:func:`stream_windows`); the rows of window ``w`` are shuffled by a permutation keyed by
    (seed, e, w), and the epoch is the windows' rows end to end cut into batches (the last partial), so step ``s`` of
    epoch ``e`` is a pure function of (seed, e, s), every training row is seen once per epoch, and a resumed run
    reads only the window(s) of its step. The shuffle is local (rows meet rows of the same window), the price of
    reading each chunk once per epoch. With ``read_ahead`` one background thread reads the next window while the
    current one trains (what it reads does not depend on timing). Methods that watch validation losses draw their
    batches from a pool of the validation rows of randomly chosen chunks (at least ``val_rows`` rows, drawn from the
    seed, read once), not from the whole split. Evaluation reads the chunked splits in order (``x[i:j]``), one chunk
    at a time.
    """

    def __init__(self, splits: Mapping[str, Sequence[TaskData]], batch_size: int, val_rows: int = 16384,
                 read_ahead: bool = True) -> None:
        missing = [s for s in ("train", "val", "test") if s not in splits]
        if missing:
            raise DataError(f"batch source: split(s) {missing} missing (have {sorted(splits)})")
        train = splits["train"]
        if len(train) != 1 or not isinstance(train[0].x, ChunkedRows):
            raise DataError("stream: the training split must be one source whose inputs are read in chunks")
        self.splits, self.batch_size, self.val_rows, self.read_ahead = splits, batch_size, val_rows, read_ahead
        self._pools: dict[tuple[int, int], TaskData] = {}

    def to(self, device: torch.device) -> StreamBatches:
        """The same splits, read onto ``device`` (targets moved now, chunked inputs as they are read)."""
        return StreamBatches({s: [d.to(device) for d in srcs] for s, srcs in self.splits.items()}, self.batch_size,
                             self.val_rows, self.read_ahead)

    def steps_per_epoch(self) -> int:
        """Batches per epoch: one pass over the training rows (the last batch partial)."""
        return math.ceil(len(self.splits["train"][0]) / self.batch_size)

    def _read(self, fn: Callable[[], TaskData]) -> Future[TaskData] | _Ready:
        global _READER
        if not self.read_ahead:
            return _Ready(fn())
        if _READER is None:
            _READER = ThreadPoolExecutor(1, thread_name_prefix="polytask-read-ahead")
        return _READER.submit(fn)

    def epoch(self, seed: int, epoch: int) -> Sequence[Batch]:
        """The training batches of ``epoch``, read when indexed (the window of the step asked for, the next one read
        ahead); a pure function of ``(seed, epoch)`` whatever the order they are asked for."""
        source = self.splits["train"][0]
        sizes = list(source.x.chunk_sizes())
        firsts = [0, *np.cumsum(sizes).tolist()]
        windows = stream_windows(sizes, source.x.shuffle_rows, seed, epoch)
        ends = np.cumsum([sum(sizes[c] for c in w) for w in windows])  # stream position after each window
        n, size = len(source), self.batch_size
        held: dict[int, Future[TaskData] | _Ready] = {}

        def read(w: int) -> Future[TaskData] | _Ready:  # window w's rows, shuffled (key w + 1: [.., 0] == [..])
            return self._read(lambda: _window(source, windows[w], firsts, (seed, epoch, _STREAM, w + 1)))

        def window(w: int) -> TaskData:
            if w not in held:
                held[w] = read(w)
            return held[w].result()

        def fetch(step: int) -> Batch:
            lo, hi = step * size, min((step + 1) * size, n)
            first, last = (int(np.searchsorted(ends, p, side="right")) for p in (lo, hi - 1))
            parts = []
            for w in range(first, last + 1):
                start = int(ends[w - 1]) if w else 0
                parts.append(_rows(window(w), max(lo, start) - start, min(hi, int(ends[w])) - start))
            for w in [w for w in held if w < first]:
                del held[w]
            if self.read_ahead and last + 1 < len(windows) and last + 1 not in held:
                held[last + 1] = read(last + 1)
            data = parts[0] if len(parts) == 1 else TaskData(
                torch.cat([p.x for p in parts]), {k: torch.cat([p.y[k] for p in parts]) for k in parts[0].y},
                None if parts[0].index is None else torch.cat([p.index for p in parts]))  # type: ignore[misc]
            return Batch([data], [torch.arange(len(data), device=data.x.device)])
        return _Lazy(self.steps_per_epoch(), fetch)

    def _pool(self, k: int, seed: int) -> TaskData:
        """The validation rows of source ``k``'s chunks taken in a seeded order until there are ``val_rows``."""
        if (k, seed) not in self._pools:
            source = self.splits["val"][k]
            sizes = list(source.x.chunk_sizes())
            chosen, rows = [], 0
            for c in permutation(len(sizes), seed, _VAL).tolist():
                if rows >= self.val_rows:
                    break
                if sizes[c]:
                    chosen.append(c)
                    rows += sizes[c]
            chosen.sort()
            self._pools[(k, seed)] = _window(source, chosen, [0, *np.cumsum(sizes).tolist()], (seed, _VAL, _STREAM, 1))
        return self._pools[(k, seed)]

    def val_batch(self, seed: int, global_step: int) -> Batch:
        """``batch_size`` validation rows drawn by ``(seed, global_step)`` from the validation pool (from the whole
        split where it is in memory)."""
        val = [self._pool(k, seed) if isinstance(s.x, ChunkedRows) else s for k, s in enumerate(self.splits["val"])]
        return validation_batch(val, self.batch_size, seed, global_step)

    def split(self, name: str) -> Sequence[TaskData]:
        """The sources of split ``name`` (chunked inputs are read as evaluation slices them)."""
        return self.splits[name]


def batch_source(splits: Mapping[str, Sequence[TaskData]], batch_size: int) -> TensorBatches | StreamBatches:
    """The batch source of a suite's splits: :class:`StreamBatches` when the training inputs are read from storage
    in chunks (a streamed table), else the in-memory :class:`TensorBatches`."""
    if any(isinstance(s.x, ChunkedRows) for s in splits["train"]):
        return StreamBatches(splits, batch_size)
    return TensorBatches(splits, batch_size)
