"""Batch order as a pure function of (seed, epoch, step): resuming needs only the data position."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


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
