"""Batch order as a pure function of (seed, epoch, step): resuming needs only the data position.

A batch source gives the loop its steps (:class:`Batch`: the sources and the rows of each) and the splits it
evaluates on; :class:`TensorBatches` is the in-memory one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from polytask.errors import DataError
from polytask.tasks.task import TaskData


def permutation(n: int, *key: int) -> Tensor:
    """A random permutation of range(n) that depends only on the integers in ``key``."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


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
            stream = torch.cat([permutation(n, seed, epoch, s, c) for c in range(cycles)])
        per_source.append([stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)])
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

    def to(self, device: torch.device) -> BatchSource: ...

    def steps_per_epoch(self) -> int: ...

    def epoch(self, seed: int, epoch: int) -> Sequence[Batch]: ...

    def val_batch(self, seed: int, global_step: int) -> Batch: ...

    def split(self, name: str) -> Sequence[TaskData]: ...


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
        return TensorBatches({s: [d.to(device) for d in srcs] for s, srcs in self.splits.items()}, self.batch_size)

    def _sizes(self) -> list[int]:
        return [len(s) for s in self.splits["train"]]

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self._sizes(), self.batch_size)

    def epoch(self, seed: int, epoch: int) -> list[Batch]:
        train = self.splits["train"]
        return [Batch(train, rows) for rows in epoch_batches(self._sizes(), self.batch_size, seed, epoch)]

    def val_batch(self, seed: int, global_step: int) -> Batch:
        val = self.splits["val"]
        return Batch(val, [permutation(len(s), seed, 7919, global_step)[:self.batch_size] for s in val])

    def split(self, name: str) -> Sequence[TaskData]:
        return self.splits[name]
