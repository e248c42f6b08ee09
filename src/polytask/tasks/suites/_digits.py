"""Helpers shared by the digit suites: scikit-learn digits, stratified pools and paired overlays.

The paired layout follows Multi-MNIST (Sabour et al., 2017, "Dynamic Routing Between Capsules";
Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization"): one digit near the
top-left corner, one near the bottom-right, each shifted by a small random jitter and combined
with a pixel-wise max.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from polytask.errors import DataError
from polytask.tasks.task import Task, TaskData

PAIR_TASKS = (
    Task("left", "classification", 10, target="top-left digit"),
    Task("right", "classification", 10, target="bottom-right digit"),
)


@lru_cache(maxsize=1)
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn 8x8 digits (UCI optdigits) as read-only float32 images in [0, 1]
    and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Row ids split into ``len(fractions)`` parts with each class spread by ``fractions``.

    Fractions are normalised to sum to one; every part is sorted.
    """
    bounds = np.cumsum(np.asarray(fractions, dtype=np.float64))
    bounds = bounds / bounds[-1]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(bounds * len(ids)).astype(np.int64)
        for part, chunk in zip(parts, np.split(ids, cuts[:-1]), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def draw_pairs(pool: np.ndarray, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """``n`` ordered pairs of two different ids from ``pool`` (with replacement across pairs)."""
    if len(pool) < 2:
        raise DataError(f"{what}: need at least 2 images to draw pairs, the pool has {len(pool)}")
    first = rng.integers(0, len(pool), n)
    second = (first + rng.integers(1, len(pool), n)) % len(pool)
    return np.stack([pool[first], pool[second]], axis=1).astype(np.int64)


def overlay(
    images: np.ndarray, pairs: np.ndarray, canvas: int, jitter: int, rng: np.random.Generator
) -> np.ndarray:
    """Paste ``images[pairs[:, 0]]`` near the top-left and ``images[pairs[:, 1]]`` near the
    bottom-right of a ``canvas`` x ``canvas`` image, each shifted by 0..``jitter`` pixels inwards,
    combined with max. Keeps the dtype of ``images``; returns shape (N, canvas, canvas)."""
    n = len(pairs)
    h, w = images.shape[1:]
    if canvas < max(h, w) + jitter:
        raise DataError(f"canvas {canvas} is too small for {h}x{w} digits with jitter {jitter}")
    out = np.zeros((n, canvas, canvas), dtype=images.dtype)
    shifts = rng.integers(0, jitter + 1, size=(n, 4))
    corners = (
        (shifts[:, 0], shifts[:, 1]),
        (canvas - h - shifts[:, 2], canvas - w - shifts[:, 3]),
    )
    for k, (top, left) in enumerate(corners):
        digits = images[pairs[:, k]]
        key = top * (canvas + 1) + left
        for value in np.unique(key):
            rows = key == value
            t, s = divmod(int(value), canvas + 1)
            region = out[rows, t : t + h, s : s + w]
            out[rows, t : t + h, s : s + w] = np.maximum(region, digits[rows])
    return out


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """float32 images in [0, 1]: uint8 is divided by 255, floats are kept."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32, copy=False)


def pair_data(
    images: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    n: int,
    canvas: int,
    jitter: int,
    rng: np.random.Generator,
    what: str,
) -> TaskData:
    """``n`` overlaid pairs from ``pool`` labelled for the ``left`` and ``right`` tasks, with the
    two source ids of each pair in ``index``."""
    pairs = draw_pairs(pool, n, rng, what)
    x = to_unit_float(overlay(images, pairs, canvas, jitter, rng))[:, None]
    y = {
        "left": torch.from_numpy(labels[pairs[:, 0]].astype(np.float32)),
        "right": torch.from_numpy(labels[pairs[:, 1]].astype(np.float32)),
    }
    return TaskData(torch.from_numpy(x), y, torch.from_numpy(pairs))
