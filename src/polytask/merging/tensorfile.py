"""The safetensors format read and written tensor by tensor with plain file reads and writes.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape and
byte offsets into the data that follows) and the raw little-endian tensor bytes. We read one tensor at a
time, never a whole file through one map (a map keeps every page it touched resident, and counted in the
process's memory, until it is closed: a whole model). A small tensor is read with ``preadv`` into a buffer;
a large one (:data:`MAP_MIN` bytes or more) is a private map of its own byte range, whose pages are read in
at once (``MADV_POPULATE_READ``) and which is unmapped when the tensor is freed (:func:`map_tensor`): the
page cache's pages are used in place, with no copy into a buffer (on a cold cache, populating the maps of a
134M-parameter bfloat16 model and eight variants, 2.4 GB, took 1.1-1.2 s and 0.09 s of CPU, against 2.2-2.9 s
and 1.5-2.3 s of system CPU for 16 MiB ``read`` calls; on this 2-core VM the first touch of the new pages,
about 2 s of CPU, then falls on the merge's own reads, so a cold merge's system CPU fell by 1.1-2.5 s and its
wall time stayed within the machine's noise, and a warm TIES merge took 3.3-3.7 s instead of 4.1-4.3). Writing
goes the other way: the header of a shard is computed from the shapes known in advance, so each tensor is written at its
final offset as soon as it exists, and no shard is ever held in memory.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.engine.checkpoint import CODES, DTYPES
from polytask.errors import CheckpointError

MAX_HEADER = 100 * 1024 * 1024
_MAX_IO = 1 << 30  # bytes per read/write call (Linux caps one call near 2 GiB)
MAP_MIN = 1 << 20  # tensors of at least this many bytes are mapped (a map and unmap cost more than a small read)
_PAGE = mmap.ALLOCATIONGRANULARITY
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11's mmap does not name it


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (in file order) and its string metadata, after checking that
    the header is well formed and that every tensor's bytes lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes "
                                      f"announced, file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        if code not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code}, which polytask cannot read "
                                  f"(known: {', '.join(DTYPES)})")
        dtype = DTYPES[code]
        if any(d < 0 for d in shape) or not (0 <= start <= end):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}")
        if end - start != math.prod(shape) * itemsize(dtype):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes but shape {list(shape)} of "
                                  f"{code} needs {math.prod(shape) * itemsize(dtype)}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} needs bytes up to {base + end}, "
                                  f"the file has {size}")
        infos[name] = TensorInfo(name, path, dtype, shape, base + start, base + end)
    order = sorted(infos.values(), key=lambda i: i.start)
    return {i.name: i for i in order}, {str(k): str(v) for k, v in meta.items()}


def read_tensor(fd: int, info: TensorInfo, buf: Tensor | None = None) -> Tensor:
    """Read one tensor's bytes from the open file ``fd`` into ``buf`` (a uint8 buffer of its size) or a new
    tensor (no memory map)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if buf is None else buf
    if info.nbytes:
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:
            try:
                got = os.preadv(fd, [view[done:done + _MAX_IO]], info.start + done)
            except OSError as e:
                raise CheckpointError(f"{info.path}: cannot read tensor {info.name!r}: {e}") from None
            if got <= 0:
                raise CheckpointError(f"{info.path}: truncated file while reading tensor {info.name!r}")
            done += got
    return buf.view(info.dtype).reshape(info.shape)


def map_tensor(fd: int, info: TensorInfo) -> Tensor:
    """Tensor ``info`` of the open file ``fd`` as a private (copy-on-write) map of its byte range, every page
    read in before it returns, so that later reads of the tensor never wait for the disk. Writing to the
    tensor changes only this process's copy of a page. The map lives as long as the tensor (and its views):
    freeing them unmaps it. Where the system cannot map files, or the range is not aligned to the dtype, the
    tensor is read (:func:`read_tensor`)."""
    size = itemsize(info.dtype)
    if info.nbytes == 0 or size == 0 or info.start % size or not hasattr(mmap, "MAP_PRIVATE"):
        return read_tensor(fd, info)
    if os.fstat(fd).st_size < info.end:  # a map past the end of a file faults (SIGBUS) where a read fails
        raise CheckpointError(f"{info.path}: truncated file while reading tensor {info.name!r}")
    lo = info.start - info.start % _PAGE
    try:
        m = mmap.mmap(fd, info.end - lo, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lo)
    except (OSError, ValueError):
        return read_tensor(fd, info)
    _populate(m, info)
    return torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=info.start - lo).view(info.shape)


def _populate(m: mmap.mmap, info: TensorInfo) -> None:
    """Read every page of the map ``m`` in now (one call), or, where the kernel cannot, touch each page."""
    try:
        m.madvise(_POPULATE_READ)
        return
    except OSError as e:
        if e.errno == errno.EFAULT:  # a page beyond the end of the file: it shrank since its header was read
            raise CheckpointError(f"{info.path}: truncated file while reading tensor {info.name!r}") from None
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise CheckpointError(f"{info.path}: cannot read tensor {info.name!r}: {e}") from None
    if hasattr(mmap, "MADV_WILLNEED"):
        m.madvise(mmap.MADV_WILLNEED)
    view = memoryview(m)
    try:
        sum(view[i] for i in range(0, len(m), _PAGE))
    finally:
        view.release()


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _MAX_IO], offset + done)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The bytes that open a safetensors file holding ``entries`` in this order (length prefix and JSON
    padded with spaces to 8 bytes), and each tensor's absolute byte range in that file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    rel: dict[str, tuple[int, int]] = {}
    for name, dtype, shape in entries:
        n = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        rel[name] = (offset, offset + n)
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {k: (s + start, e + start) for k, (s, e) in rel.items()}
