"""MNIST streams, read from a user's ``.npz`` (x_train, y_train, x_test, y_test) or directory of IDX files with the
``multimnist`` suite's reader; nothing is downloaded (benchmarks use ``../shared/data/mnist.npz``).

- ``split-mnist``: the ten digits in experiences of two (Zenke, Poole & Ganguli 2017, "Continual Learning Through
  Synaptic Intelligence"), in the task, class or domain scenario (van de Ven, Tuytelaars & Tolias 2022).
- ``permuted-mnist``: every experience the ten digits under its own fixed pixel permutation (Goodfellow et al.
  2013, "An Empirical Investigation of Catastrophic Forgetting"; Kirkpatrick et al. 2017, EWC).
- ``rotated-mnist``: every experience the ten digits rotated by its own fixed angle (Lopez-Paz & Ranzato 2017,
  "Gradient Episodic Memory for Continual Learning").

Validation rows are carved from MNIST's training images, stratified by class, with the seed; the test split is
MNIST's test set. ``n_train_per_class`` / ``n_test_per_class`` draw a seeded subset of each class first (for speed).
Pixels are scaled to [0, 1] (uint8 images are divided by 255; float images are taken as they are). A transformed
stream holds one transformed copy of the images per experience: the full MNIST costs about 220 MB (float32) per
experience, so 10 permutations take 2.2 GB; subsample to keep it small.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from polytask.continual.stream import STREAMS, Stream, class_splits, seeded_groups
from polytask.continual.streams.domains import Split, domain_stream
from polytask.errors import DataError
from polytask.tasks.suites._digits import stratified_split
from polytask.tasks.suites.multimnist import load_mnist
from polytask.tasks.task import SPLITS

DIGITS = tuple(range(10))


class MnistParams(BaseModel):
    """What every MNIST stream reads."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="MNIST: an .npz (x_train, y_train, x_test, y_test) or a directory of IDX files")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of the training images held out for "
                                "validation (stratified by class, with the seed)")
    n_train_per_class: int | None = Field(None, ge=2, description="use at most this many training images of each "
                                          "class (a seeded draw, before validation is carved out); default: all")
    n_test_per_class: int | None = Field(None, ge=1, description="use at most this many test images of each class "
                                         "(a seeded draw); default: all")
    flatten: bool = Field(True, description="inputs as vectors of H*W pixels (for an mlp); off: (1, H, W) images")


def _per_class(labels: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most ``n`` rows of each class (a seeded draw); all rows when ``n`` is None."""
    if n is None:
        return np.arange(len(labels), dtype=np.int64)
    parts = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def mnist_pools(params: MnistParams, seed: int) -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
    """MNIST's train and test images as one (N, H, W) float tensor in [0, 1] (test rows after the train rows), their
    int64 labels, and the row ids of train, val and test."""
    arrays = load_mnist(Path(params.path).expanduser())
    n_train = len(arrays["y_train"])
    images = np.concatenate([arrays["x_train"], arrays["x_test"]])
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    pick, split, pick_test = np.random.default_rng(seed).spawn(3)
    pool = _per_class(labels[:n_train], params.n_train_per_class, pick)
    train, val = (pool[p] for p in stratified_split(labels[pool], (1 - params.val_fraction, params.val_fraction),
                                                    split))
    test = n_train + _per_class(labels[n_train:], params.n_test_per_class, pick_test)
    rows = {"train": train, "val": val, "test": test}
    empty = [s for s, r in rows.items() if not len(r)]
    if empty:
        raise DataError(f"MNIST {params.path}: the {' and '.join(empty)} split(s) would be empty ({len(pool)} training "
                        f"images, val_fraction {params.val_fraction}); use more images per class or a larger "
                        "val_fraction")
    x = torch.from_numpy(images)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x, labels, rows


def _inputs(x: torch.Tensor, flatten: bool) -> torch.Tensor:
    """(N, H, W) images as (N, H*W) vectors or (N, 1, H, W) images."""
    return x.reshape(len(x), -1) if flatten else x[:, None]


class SplitMnistParams(MnistParams):
    """Parameters of ``split-mnist``."""

    scenario: Literal["task", "class", "domain"] = Field("class", description="task, class or domain incremental")
    classes_per_experience: int = Field(2, ge=1, le=10)
    class_order: list[int] | None = Field(None, description="the digits in arrival order (default: by the seed "
                                          "when shuffle, else 0..9)")
    shuffle: bool = Field(False, description="draw the class order from the seed")


@STREAMS.register("split-mnist", params=SplitMnistParams,
                  summary="MNIST in 5 experiences of 2 digits (task, class or domain); from an .npz or IDX files",
                  paper="Zenke et al. 2017; van de Ven, Tuytelaars & Tolias 2022")
def split_mnist(params: SplitMnistParams, seed: int) -> Stream:
    """Experience i holds the train/val/test rows of the digits of group i (``index``: MNIST row ids, test rows
    offset by the number of training images)."""
    x, labels, rows = mnist_pools(params, seed)
    groups = seeded_groups(range(10), params.classes_per_experience, params.class_order, seed, params.shuffle)
    return class_splits("split-mnist", _inputs(x, params.flatten), labels, rows, groups, params.scenario,
                        {"source": params.path, "seed": seed})


def pixel_permutation(seed: int, experience: int, n_pixels: int, identity: bool = False) -> torch.Tensor:
    """The fixed pixel permutation of ``experience``: drawn from ``numpy.random.default_rng([seed, experience])``
    (the identity when ``identity``), so it can be recomputed from what the stream records."""
    if identity:
        return torch.arange(n_pixels)
    return torch.from_numpy(np.random.default_rng([seed, experience]).permutation(n_pixels))


def _transformed(name: str, scenario: str, x: torch.Tensor, labels: np.ndarray, rows: dict[str, np.ndarray],
                 views: list[tuple[str, Any]], apply: Callable[[torch.Tensor, Any], torch.Tensor], flatten: bool,
                 info: dict[str, Any]) -> Stream:
    """The same rows in every experience, experience ``e``'s inputs ``apply(images, view)``."""
    experiences = []
    for ename, view in views:
        splits: dict[str, Split] = {s: (_inputs(apply(x[torch.from_numpy(rows[s])], view), flatten),
                                        labels[rows[s]], rows[s]) for s in SPLITS}
        experiences.append((ename, splits))
    return domain_stream(name, scenario, experiences, DIGITS, "digit", info)


class PermutedMnistParams(MnistParams):
    """Parameters of ``permuted-mnist``."""

    scenario: Literal["task", "class", "domain"] = Field("domain", description="domain (one head, the usual "
                                                         "protocol), task (a head per permutation) or class (10 new "
                                                         "classes per permutation)")
    n_experiences: int = Field(10, ge=1, le=100)
    first_identity: bool = Field(True, description="experience 0 is MNIST unpermuted (as van de Ven et al. do); "
                                 "off: every experience is permuted (as Avalanche's PermutedMNIST)")


@STREAMS.register("permuted-mnist", params=PermutedMnistParams,
                  summary="MNIST under a fixed seeded pixel permutation per experience (domain by default)",
                  paper="Goodfellow et al. 2013; Kirkpatrick et al. 2017")
def permuted_mnist(params: PermutedMnistParams, seed: int) -> Stream:
    """Experience i permutes the pixels of every train, val and test image with :func:`pixel_permutation`
    ``(seed, i)``; ``info['permutations']`` records each permutation's seed."""
    x, labels, rows = mnist_pools(params, seed)
    n_pixels = math.prod(x.shape[1:])
    views = [(f"p{i}", pixel_permutation(seed, i, n_pixels, identity=params.first_identity and i == 0))
             for i in range(params.n_experiences)]

    def permute(images: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return images.reshape(len(images), -1)[:, perm].reshape(images.shape)

    info = {"source": params.path, "seed": seed, "permutations": [
        {"experience": e, "identity": bool(params.first_identity and i == 0), "rng": [seed, i]}
        for i, (e, _) in enumerate(views)]}
    return _transformed("permuted-mnist", params.scenario, x, labels, rows, views, permute, params.flatten, info)


def rotate(images: torch.Tensor, degrees: float, chunk: int = 4096) -> torch.Tensor:
    """(N, H, W) images rotated ``degrees`` counter-clockwise about their centre (as ``torch.rot90`` with k = 1 for
    90): bilinear interpolation at the rotated pixel centres (``affine_grid``/``grid_sample``, align_corners=False),
    zeros outside the image, computed in float64 so 0 and multiples of 90 degrees move pixels exactly."""
    if not len(images):
        return images.clone()
    h, w = images.shape[1:]
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # the rotation in pixel units, in grid_sample's normalised [-1, 1] coordinates of a possibly non-square image
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float64)
    out = []
    for part in images.split(chunk):
        grid = F.affine_grid(theta.expand(len(part), 2, 3), [len(part), 1, h, w], align_corners=False)
        out.append(F.grid_sample(part.double()[:, None], grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)[:, 0].to(images.dtype))
    return torch.cat(out)


def rotation_matrix(h: int, w: int, degrees: float) -> torch.Tensor:
    """:func:`rotate` as the fixed linear map it is, a float32 (H*W, H*W) matrix M with ``rotate(x) = x @ M`` on
    flattened images (its rows: the rotated basis images); applying it is several times faster than resampling
    every image."""
    return rotate(torch.eye(h * w, dtype=torch.float64).reshape(h * w, h, w), degrees).reshape(h * w, h * w).float()


def _rotated(images: torch.Tensor, degrees: float) -> torch.Tensor:
    return (images.reshape(len(images), -1) @ rotation_matrix(*images.shape[1:], degrees)).reshape(images.shape)


class RotatedMnistParams(MnistParams):
    """Parameters of ``rotated-mnist``."""

    scenario: Literal["task", "class", "domain"] = Field("domain", description="domain (one head), task or class")
    angles: list[float] | None = Field(None, min_length=1, description="the angle of each experience in degrees, "
                                       "counter-clockwise (default: n_experiences steps of angle_step from 0)")
    n_experiences: int = Field(5, ge=1, le=100)
    angle_step: float = Field(22.5, description="degrees between consecutive experiences when angles is not given")


@STREAMS.register("rotated-mnist", params=RotatedMnistParams,
                  summary="MNIST rotated by a fixed angle per experience (0, 22.5, 45, ... by default; domain)",
                  paper="Lopez-Paz & Ranzato 2017")
def rotated_mnist(params: RotatedMnistParams, seed: int) -> Stream:
    """Experience i rotates every train, val and test image by ``angles[i]`` (:func:`rotate`, bilinear, zeros
    outside, applied as :func:`rotation_matrix`); ``info['angles']`` records them."""
    angles = params.angles or [i * params.angle_step for i in range(params.n_experiences)]
    views = [(f"r{i}", float(a)) for i, a in enumerate(angles)]
    x, labels, rows = mnist_pools(params, seed)
    info = {"source": params.path, "seed": seed, "angles": [float(a) for a in angles],
            "interpolation": "bilinear, zeros outside, rotated about the image centre"}
    return _transformed("rotated-mnist", params.scenario, x, labels, rows, views, _rotated, params.flatten, info)
