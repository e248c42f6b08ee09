"""Sharded safetensors output, built in a temporary directory and renamed into place when complete.

The shapes and dtypes of every output tensor are known before merging starts, so each shard's header is
written first and every tensor is then written straight to its final offset: memory never holds a
shard, only the tensor being written. If anything fails, the temporary directory is removed and the
output path is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from polytask.errors import CheckpointError, ConfigError
from polytask.merging.tensorfile import build_header, itemsize, tensor_bytes, write_all

Entry = tuple[str, torch.dtype, tuple[int, ...]]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from ``2GB``, ``500MiB``, ``1e9`` or an int."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    if unit not in _UNITS or not num:
        raise ConfigError(f"size {value!r}: expected a number of bytes or e.g. 2GB, 500MiB")
    return int(float(num) * _UNITS[unit])


def plan_shards(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Split ``entries`` (in order) into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[2]) * itemsize(e[1])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


class ShardedWriter:
    """Writes the planned tensors into ``out`` (a directory), atomically.

    Use as a context manager: leaving the block with an exception removes everything written so far.
    """

    def __init__(self, out: str | os.PathLike[str], entries: list[Entry], shard_bytes: int,
                 metadata: dict[str, str] | None = None, overwrite: bool = False, fsync: bool = True,
                 prefix: str = "model") -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise ConfigError(f"output {self.out} already exists; choose another path or set output.overwrite: true")
        if shard_bytes <= 0:
            raise ConfigError("output.shard_size must be positive")
        self.fsync = fsync
        self.prefix = prefix
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        shards = plan_shards(entries, shard_bytes)
        n = len(shards)
        self.files = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[int, int, int]] = {}
        self.spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.fds: list[int] = []
        self.total = 0
        self.written: set[str] = set()
        try:
            for i, (fname, shard) in enumerate(zip(self.files, shards, strict=True)):
                head, offsets = build_header(shard, metadata)
                fd = os.open(self.tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self.fds.append(fd)
                end = max((e for _, e in offsets.values()), default=len(head))
                os.ftruncate(fd, end)
                write_all(fd, memoryview(head), 0)
                for name, dtype, shape in shard:
                    self.where[name] = (i, *offsets[name])
                    self.spec[name] = (dtype, tuple(shape))
                    self.total += offsets[name][1] - offsets[name][0]
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: Tensor) -> None:
        dtype, shape = self.spec[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"internal: output tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                                  f"planned {dtype} {list(shape)}")
        i, start, _ = self.where[name]
        write_all(self.fds[i], tensor_bytes(tensor), start)
        self.written.add(name)

    def add_file(self, name: str, data: bytes) -> None:
        (self.tmp / name).write_bytes(data)

    def copy_file(self, src: Path) -> None:
        shutil.copy2(src, self.tmp / src.name)

    def commit(self) -> Path:
        """Write the shard index, flush, and rename the finished directory to ``out``."""
        missing = [n for n in self.where if n not in self.written]
        if missing:
            raise CheckpointError(f"internal: output tensor {missing[0]!r} was never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: self.files[w[0]] for n, w in self.where.items()}}
            (self.tmp / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")
        for fd in self.fds:
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
        self.fds = []
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if self.fsync:
            fd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.out

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
