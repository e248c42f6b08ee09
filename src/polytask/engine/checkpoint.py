"""Checkpoints as one safetensors file: tensors stored as tensors, everything else as JSON.

A training state is a tree of dicts, lists, tuples, numbers, strings and tensors (model and optimiser
state dicts, RNG states, weighting state, data position). It is flattened into named tensors plus a JSON
skeleton kept in the safetensors header, so loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from polytask.errors import CheckpointError
from polytask.io import atomic_write_bytes

_KEY = "polytask"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):  # first: most nodes are numbers and names
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
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

    ``safetensors.torch.save`` writes the header's keys in the order of a randomly seeded hash map, so two
    identical runs wrote different files; the header is written again here with its keys sorted (the data
    layout, by dtype then name, is already fixed)."""
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def dumps(tree: Any) -> bytes:
    """Serialise a state tree to safetensors bytes (the same tree always gives the same bytes)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    return tensors_to_bytes(tensors, {_KEY: json.dumps(skeleton)})


def save(path: str | os.PathLike[str], tree: Any) -> Path:
    """Write a state tree atomically (temporary file, fsync, rename); a failed write names the file."""
    return atomic_write_bytes(path, dumps(tree))


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
