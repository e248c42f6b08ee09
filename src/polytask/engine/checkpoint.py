"""Checkpoints as one safetensors file: tensors stored as tensors, everything else as JSON.

A training state is a tree of dicts, lists, tuples, numbers, strings and tensors (model and optimiser
state dicts, RNG states, weighting state, data position). It is flattened into named tensors plus a JSON
skeleton kept in the safetensors header, so loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from polytask.engine import faults
from polytask.errors import CheckpointError
from polytask.io import atomic_write_bytes

_KEY = "polytask"

# safetensors' dtype codes (the header's "dtype" field) and the torch dtypes they name
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


_LEAVES = frozenset({type(None), bool, int, float, str})  # exact types: JSON stores them as they are


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    kind = type(obj)
    if kind in _LEAVES:  # first: most nodes are numbers and names
        return obj
    if kind is dict and all(type(k) is str for k in obj):  # one pass; a leaf value costs no call
        return {"__dict__": {k: v if type(v) in _LEAVES else _encode(v, tensors) for k, v in obj.items()}}
    if kind is list:
        return [v if type(v) in _LEAVES else _encode(v, tensors) for v in obj]
    if isinstance(obj, (bool, int, float, str)):  # subclasses (numpy's float64, enums)
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach()  # its bytes are copied once, when the file is written
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    raise CheckpointError(f"unknown node in checkpoint skeleton: {sorted(obj)}")


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file whose bytes depend only on the tensors and metadata.

    Written here rather than by ``safetensors.torch.save``, which orders the header by a randomly seeded hash map
    (two identical runs wrote different files) and copies every tensor three times; here the header's keys are
    sorted, the data laid out by element size (largest first, so every tensor is aligned to its element) then name,
    as safetensors lays it out, and each tensor's bytes copied once, into the result."""
    header: dict[str, Any] = {}
    blocks: list[Any] = []
    offset = 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in CODES:
            raise TypeError(f"tensor {name!r}: safetensors cannot store {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        if size:
            blocks.append(t.reshape(-1).view(torch.uint8).numpy())
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *blocks])


def dumps(tree: Any) -> bytes:
    """Serialise a state tree to safetensors bytes (the same tree always gives the same bytes)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    return tensors_to_bytes(tensors, {_KEY: json.dumps(skeleton, separators=(",", ":"))})  # compact: less to escape


def save(path: str | os.PathLike[str], tree: Any) -> Path:
    """Write a state tree atomically (temporary file, fsync, rename); a failed write names the file."""
    return atomic_write_bytes(path, dumps(tree))


class BackgroundWriter:
    """A job's checkpoints written off the training thread, durably, in order, never blocking training.

    ``save`` serialises the tree at once (a snapshot: training may change the tensors right after) and queues the
    write, fsync and rename for one worker thread, which releases the GIL while the disk works. A save of a file
    whose previous save is still queued (not yet started) replaces it: when saves come faster than the disk lands
    them (short epochs), the file goes straight to the newest state instead of the training thread waiting for every
    intermediate one. Files of different paths land in the order they were saved, and a file's ``then()`` runs
    after it lands; :meth:`then` queues a call of its own, after everything queued before it. A write that failed
    raises (its StorageError names the file) at the next ``save`` or ``wait``. A process killed while a write is in
    flight or queued keeps the previous file, whole (the rename is atomic), and resumes from it: a little earlier,
    as exactly. The worker is not a daemon: an exception in the training thread still lets the queued writes
    finish."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # path -> (bytes, then, folder), oldest save first; a call of its own (``then``): a key of its own, no bytes
        self._queue: dict[Any, tuple[bytes | None, Any, bool]] = {}
        self._draining = False  # a worker is writing the queue (set and cleared under the lock)
        self._drain: Future[Any] | None = None
        self._error: BaseException | None = None
        faults.track(self)

    def save(self, path: str | os.PathLike[str], tree: Any, then: Any = None, folder: bool = True) -> None:
        """Write ``tree`` to ``path`` as :func:`save` does, in the background; ``then()`` runs after it lands.
        ``folder=False``: without the folder's fsync (:func:`polytask.io.atomic_write_bytes`)."""
        self._put(Path(path), dumps(tree), then, folder)

    def then(self, call: Any) -> None:
        """Run ``call()`` on the worker once every write queued before it has landed (a record that must not land
        before the state it records; ``call`` may be queued while that state is still being computed from)."""
        self._put(object(), None, call, False)

    def _put(self, key: Any, data: bytes | None, then: Any, folder: bool) -> None:
        with self._lock:
            self._raise_failed()
            self._queue.pop(key, None)  # a queued older save of this file is replaced; the newest goes last
            self._queue[key] = (data, then, folder)
            if self._draining:
                return  # the running worker takes it
            self._draining = True
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="polytask-checkpoint")
            self._drain = self._pool.submit(self._write_queued)

    def _write_queued(self) -> None:
        """The worker: write the queued files, oldest first, until the queue is empty; a failure keeps its error
        for the training thread and drops the rest."""
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                path = next(iter(self._queue))
                data, then, folder = self._queue.pop(path)
            try:
                if data is not None:
                    atomic_write_bytes(path, data, folder=folder)
                if then is not None:
                    then()
            except BaseException as e:
                with self._lock:
                    self._error = e
                    self._queue.clear()
                    self._draining = False
                return

    def _raise_failed(self) -> None:
        """Raise (once) the error of a write that failed (called under the lock)."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def wait(self) -> None:
        """Block until every queued write has landed; raise the error of a write that failed."""
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.result()  # only the training thread queues writes: once this worker is done, the queue is empty
        with self._lock:
            self._raise_failed()

    def close(self) -> None:
        """Wait for the last write and stop the worker."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        """Close; when the block raised, its error is the one to see (the queued writes still land)."""
        if kind is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()


def load(path: str | os.PathLike[str]) -> Any:
    """Read a state tree written by :func:`save`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types on a bad file
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
    if _KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a polytask checkpoint")
    return _decode(json.loads(meta[_KEY]), tensors)
