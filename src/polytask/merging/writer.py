"""Sharded safetensors output, built in a temporary directory and renamed into place when complete.

The shapes and dtypes of every output tensor are known before merging starts, so each shard's header is
written first and every tensor is then written straight to its final offset: memory never holds a
shard, only the tensor being written. If anything fails, the temporary directory is removed and the
output path is left as it was.

The temporary directory is ``.<output>.partial-<pid>`` beside the output, locked (``flock``) while its
writer lives. Disk space for every shard is reserved when the writer starts, so a full disk is found before
any merging work, and a write that fails anyway raises :class:`~polytask.errors.StorageError` naming the
file. A partial directory left by a killed process (its lock free, or its pid gone) is removed by the next
writer of the same output.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.errors import CheckpointError, ConfigError, RunLockedError, StorageError
from polytask.io import DirLock, pid_alive
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


LOCK = ".polytask-writer.lock"
SYNC_EVERY = 64 << 20  # bytes written to a shard between flushes to disk (with fsync)


def storage_error(path: Path, e: OSError) -> StorageError:
    """A failed write as an error naming the file (the partial output is removed by the caller)."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = "; free space there and run the merge again" if full else ""
    err = StorageError(f"cannot write {path}: {e.strerror or e} [errno {e.errno}]; nothing was left behind{hint}")
    err.errno, err.filename = e.errno, str(path)
    return err


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove what killed writers of ``out`` left beside it: ``.<name>.partial-<pid>`` directories whose lock
    is free (or, without a lock file, whose pid is gone), and ``.<name>.old-<pid>`` copies of a replaced
    output (moved back to ``out`` if the kill came before the new output was in place). Returns them."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    found = []
    for p in sorted(out.parent.glob(f".{out.name}.*-*")) if out.parent.is_dir() else []:
        m = pattern.match(p.name)
        if not m or int(m.group(2)) == os.getpid() or not _dead(p, int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            os.replace(p, out)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        found.append(p)
    return found


def _dead(path: Path, pid: int) -> bool:
    if (path / LOCK).is_file():
        try:
            DirLock(path, LOCK).acquire().release()
        except RunLockedError:
            return False
        except OSError:
            return not pid_alive(pid)
        return True
    return not pid_alive(pid)


def _guard(path: Path, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise storage_error(path, e) from e


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

    Use as a context manager: leaving the block with an exception removes everything written so far. With
    ``fsync`` each shard is also flushed to disk every :data:`SYNC_EVERY` bytes as it is written (on the
    writing thread: the streaming merge's writer, while the next tensors are merged), so little is left to
    flush before the rename.
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
        self.removed_stale = remove_stale_partials(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        _guard(self.out.parent, self.tmp.mkdir, 0o777, True)
        self.lock: DirLock | None = None
        self.fds: list[int] = []
        shards = plan_shards(entries, shard_bytes)
        n = len(shards)
        self.files = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[int, int, int]] = {}
        self.spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.total = 0
        self.written: set[str] = set()
        self.unsynced = [0] * n
        try:
            self.lock = _guard(self.tmp / LOCK, DirLock(self.tmp, LOCK).acquire)
            for i, (fname, shard) in enumerate(zip(self.files, shards, strict=True)):
                head, offsets = build_header(shard, metadata)
                target = self.out / fname
                fd = _guard(target, os.open, self.tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self.fds.append(fd)
                end = max((e for _, e in offsets.values()), default=len(head))
                _guard(target, _reserve, fd, end)
                _guard(target, write_all, fd, memoryview(head), 0)
                for name, dtype, shape in shard:
                    self.where[name] = (i, *offsets[name])
                    self.spec[name] = (dtype, tuple(shape))
                    self.total += offsets[name][1] - offsets[name][0]
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: Tensor) -> None:
        """Write planned tensor ``name`` straight to its place in its shard (dtype and shape must be as planned)."""
        dtype, shape = self.spec[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"internal: output tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                                  f"planned {dtype} {list(shape)}")
        i, start, end = self.where[name]
        _guard(self.out / self.files[i], write_all, self.fds[i], tensor_bytes(tensor), start)
        self.written.add(name)
        self.unsynced[i] += end - start
        if self.fsync and self.unsynced[i] >= SYNC_EVERY:
            _guard(self.out / self.files[i], os.fdatasync, self.fds[i])
            self.unsynced[i] = 0

    def add_file(self, name: str, data: bytes) -> None:
        """Add a file beside the shards (e.g. a config), written into the output with them."""
        _guard(self.out / name, (self.tmp / name).write_bytes, data)

    def copy_file(self, src: Path) -> None:
        """Copy ``src`` (e.g. a tokenizer file of the base model) into the output under its own name."""
        _guard(self.out / src.name, shutil.copy2, src, self.tmp / src.name)

    def commit(self) -> Path:
        """Write the shard index, flush, and rename the finished directory to ``out``."""
        missing = [n for n in self.where if n not in self.written]
        if missing:
            raise CheckpointError(f"internal: output tensor {missing[0]!r} was never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: self.files[w[0]] for n, w in self.where.items()}}
            self.add_file(f"{self.prefix}.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
        while self.fds:
            fd = self.fds.pop()
            try:
                if self.fsync:
                    _guard(self.out / self.files[len(self.fds)], os.fsync, fd)
            finally:
                os.close(fd)
        self._unlock()
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

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            (self.tmp / LOCK).unlink(missing_ok=True)
            self.lock = None

    def abort(self) -> None:
        """Close the shards and remove the unfinished output (the exception path of the context manager)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size, with its disk blocks allocated now where the file system can (so a full
    disk fails here, before merging), else as a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
