"""``multimnist``: two MNIST digits overlaid on one canvas, tasks ``left`` and ``right``.

The protocol of Sabour et al. (2017, "Dynamic Routing Between Capsules") as used for multi-task
learning by Sener & Koltun (2018, "Multi-Task Learning as Multi-Objective Optimization"): a digit
near the top-left and one near the bottom-right of a 36x36 canvas, each jittered, combined with
max. A validation pool is held out from the MNIST training images before pairing, and test pairs
use only MNIST test images. MNIST itself (LeCun et al., 1998) is read from a user's ``.npz`` or
a directory of IDX files; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.errors import DataError
from polytask.tasks.registry import SUITES
from polytask.tasks.suites._digits import PAIR_TASKS, pair_data, stratified_split
from polytask.tasks.task import TaskSuite

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic 0x0000 | type | ndim, big-endian int32 dims,
    then the data), gzip-decompressed when the name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: its header needs {header} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = math.prod(shape)
    if len(raw) - header < count * dtype.itemsize:
        raise DataError(
            f"IDX file {path} is truncated: shape {shape} needs {count * dtype.itemsize} data "
            f"bytes, found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(shape)


def _idx_path(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST directory {directory} has no {name} (or {name}.gz)")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read MNIST file {path} as .npz: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"MNIST file {path} is not an .npz archive of named arrays")
    with npz:
        missing = [k for k in IDX_FILES if k not in npz.files]
        if missing:
            raise DataError(f"MNIST file {path} lacks the array(s) {missing}")
        try:
            return {k: npz[k] for k in IDX_FILES}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read MNIST file {path}: {e}") from None


def load_mnist(path: Path) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test from an ``.npz`` file or a directory of IDX files."""
    if not path.exists():
        raise DataError(
            f"MNIST path {path} does not exist (give an .npz or a directory of IDX files)"
        )
    if path.is_dir():
        arrays = {key: read_idx(_idx_path(path, name)) for key, name in IDX_FILES.items()}
    else:
        arrays = _read_npz(path)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"MNIST {path}: {split} images must be (N, H, W) and labels (N,), got "
                f"{x.shape} and {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"MNIST {path}: {split} labels must lie in 0..9")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"MNIST {path}: train and test images differ in size")
    return arrays


class MultiMnistParams(BaseModel):
    """Parameters of the ``multimnist`` suite."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="MNIST: an .npz (x_train, y_train, x_test, y_test) or a directory of IDX files"
    )
    canvas: int = Field(36, ge=1, le=256, description="side of the square canvas in pixels")
    jitter: int = Field(4, ge=0, le=64, description="largest random inward shift of each digit")
    resize: int | None = Field(
        None, ge=4, le=256, description="resize the canvas to this side (bilinear, antialiased)"
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of MNIST train images held out as the val pool"
    )
    n_train: int = Field(60000, ge=1, description="number of training pairs")
    n_val: int = Field(6000, ge=1, description="number of validation pairs")
    n_test: int = Field(10000, ge=1, description="number of test pairs")

    @model_validator(mode="after")
    def _check(self) -> MultiMnistParams:
        if self.jitter >= self.canvas:
            raise ValueError(f"jitter {self.jitter} must be smaller than canvas {self.canvas}")
        return self


@SUITES.register(
    "multimnist",
    params=MultiMnistParams,
    summary="two MNIST digits overlaid on a 36x36 canvas; tasks: left and right digit class",
    paper="Sabour et al. 2017; Sener & Koltun 2018",
)
def build(params: MultiMnistParams, seed: int) -> TaskSuite:
    """Pairs drawn within the train, held-out val and test pools; ``index`` holds the source ids
    (MNIST train rows, then test rows offset by the number of train images)."""
    mnist = load_mnist(Path(params.path).expanduser())
    n_train_images = len(mnist["y_train"])
    images = np.concatenate([mnist["x_train"], mnist["x_test"]])
    labels = np.concatenate([mnist["y_train"], mnist["y_test"]]).astype(np.int64)
    pool_rng, *pair_rngs = np.random.default_rng(seed).spawn(4)
    train_pool, val_pool = stratified_split(
        labels[:n_train_images], (1 - params.val_fraction, params.val_fraction), pool_rng
    )
    test_pool = np.arange(n_train_images, len(labels), dtype=np.int64)
    pools = {"train": train_pool, "val": val_pool, "test": test_pool}
    sizes = {"train": params.n_train, "val": params.n_val, "test": params.n_test}
    splits = {}
    for (split, pool), rng in zip(pools.items(), pair_rngs, strict=True):
        data = pair_data(images, labels, pool, sizes[split], params.canvas, params.jitter, rng,
                         f"multimnist {split} pool ({params.path})")
        if params.resize is not None and params.resize != params.canvas:
            data.x = F.interpolate(data.x, size=(params.resize, params.resize), mode="bilinear",
                                   antialias=True, align_corners=False).clamp_(0, 1)
        splits[split] = (data,)
    info = {
        "params": params.model_dump(mode="json"),
        "n_train_images": n_train_images,
        "pool_sizes": {s: len(p) for s, p in pools.items()},
    }
    return TaskSuite("multimnist", PAIR_TASKS, splits, info)

