"""Checkpoints as indexes of named tensors, each read only when asked for.

``open_checkpoint`` accepts a ``.safetensors`` file, a Hugging Face model directory (one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``), a PEFT LoRA adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``), a polytask job directory
(``jobs/<job>/best.safetensors``) or run directory (with ``job=``), and, only with ``allow_pickle``,
pickle-based ``.bin``/``.pt`` files loaded with ``torch.load(weights_only=True)``.

A LoRA adapter is a checkpoint relative to a base: ``load(name, base)`` returns ``base + B·A·scale`` for
an adapted weight (Hu et al. 2022, "LoRA"; scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA,
Kalajdzievski 2023) and ``base`` for every other tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.errors import CheckpointError
from polytask.merging import tensorfile
from polytask.merging.tensorfile import TensorInfo, map_tensor, read_header, read_tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".h5", ".msgpack", ".gguf", ".onnx")


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of a tensor, and the file that holds it (for error messages)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


class Checkpoint:
    """Named tensors read one at a time. ``names()`` are in storage order; ``meta`` needs no read."""

    path: Path
    relative: bool = False  # True: tensors are defined relative to a base (a LoRA adapter)

    def names(self) -> list[str]:
        """The names of the tensors this checkpoint holds (for an adapter: the base tensors it changes)."""
        raise NotImplementedError

    def meta(self, name: str) -> TensorMeta:
        """Dtype, shape and file of tensor ``name``, read from headers only (checks run before any tensor is loaded);
        an unknown name is a CheckpointError naming the checkpoint."""
        raise NotImplementedError

    def load(self, name: str, base: Tensor | None = None, *, pool: Any = None) -> Tensor:
        """Tensor ``name`` (``base``: the base model's, for checkpoints relative to it; ``pool``: a
        :class:`~polytask.merging.stream.BufferPool` whose buffers a read may fill)."""
        raise NotImplementedError

    @property
    def config_dir(self) -> Path | None:
        """The directory whose config and tokenizer files describe this model, if any."""
        return self.path if self.path.is_dir() else None

    def close(self) -> None:
        """Release open files."""

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a single file or a sharded directory), read tensor by tensor: a large
    tensor is a map of its bytes (:func:`~polytask.merging.tensorfile.map_tensor`), a small one is read into a
    buffer (of ``pool``, when given)."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            infos, meta = read_header(f)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._infos:
                    raise CheckpointError(f"{path}: tensor {name!r} is stored twice, in {self._infos[name].path.name} "
                                          f"and {f.name}")
                self._infos[name] = info
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def meta(self, name: str) -> TensorMeta:
        i = self.info(name)
        return TensorMeta(name, i.dtype, i.shape, i.path)

    def load(self, name: str, base: Tensor | None = None, *, pool: Any = None) -> Tensor:
        info = self.info(name)
        with self._lock:  # readers on several threads share one descriptor per file (reads are positional)
            fd = self._fds.get(info.path)
            if fd is None:
                try:
                    fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"cannot open {info.path}: {e}") from None
        if info.nbytes >= tensorfile.MAP_MIN:
            return map_tensor(fd, info)
        return read_tensor(fd, info, pool.get(info.nbytes) if pool is not None else None)

    @property
    def config_dir(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PickleCheckpoint(Checkpoint):
    """A pickle-based state dict (``.bin``/``.pt``), loaded whole with ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self._tensors: dict[str, Tensor] = {}
        self._file: dict[str, Path] = {}
        for f in files:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=_is_zip(f))
            except Exception as e:  # torch raises many kinds for a bad or unsafe pickle
                raise CheckpointError(f"cannot load {f} with torch.load(weights_only=True): {e}") from None
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{f}: expected a dict of tensors, found {type(obj).__name__}")
            for name, t in obj.items():
                if not isinstance(t, Tensor):
                    raise CheckpointError(f"{f}: entry {name!r} is a {type(t).__name__}, not a tensor")
                if name in self._tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} is stored twice")
                self._tensors[str(name)] = t
                self._file[str(name)] = f

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def meta(self, name: str) -> TensorMeta:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        t = self._tensors[name]
        return TensorMeta(name, t.dtype, tuple(t.shape), self._file[name])

    def load(self, name: str, base: Tensor | None = None, *, pool: Any = None) -> Tensor:
        self.meta(name)
        return self._tensors[name].clone()


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: the adapter tensors of its A and B factors and its scale."""

    target: str
    a: str
    b: str
    scale: float
    fan_in_fan_out: bool


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter read as a model relative to its base: adapted weights are
    ``base + B @ A * scale``, other adapter tensors (``modules_to_save``) replace the base tensor."""

    relative = True

    def __init__(self, path: Path, weights: Checkpoint, config: dict, base_names: list[str] | None = None) -> None:
        self.path = path
        self.weights = weights
        self.config = config
        for flag in ("use_dora",):
            if config.get(flag):
                raise CheckpointError(f"{path}: {flag} adapters are not supported (only plain LoRA)")
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: PEFT type {config.get('peft_type')!r} is not supported (only LORA)")
        self.modules: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}
        pairs: dict[str, dict[str, str]] = {}
        for key in weights.names():
            m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = key
            elif ".lora_" in key:
                raise CheckpointError(f"{weights.path}: adapter tensor {key!r} is not supported "
                                      "(only lora_A/lora_B weights)")
            else:
                self.replaced[_strip_peft(key)] = key
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{weights.path}: adapter module {module!r} has lora_{next(iter(ab))} "
                                      "but not its partner")
            r = weights.meta(ab["A"]).shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            scale = float(alpha) / math.sqrt(r) if config.get("use_rslora") else float(alpha) / r
            target = _strip_peft(module) + ".weight"
            self.modules[target] = LoraModule(target, ab["A"], ab["B"], scale, bool(config.get("fan_in_fan_out")))
        if base_names is not None:
            self.resolve(base_names)

    def resolve(self, base_names: list[str]) -> None:
        """Map adapter names onto the base model's names (PEFT's prefixes differ between model classes)."""
        names = set(base_names)
        self.modules = {self._match(t, names): m for t, m in self.modules.items()}
        self.replaced = {self._match(t, names): k for t, k in self.replaced.items()}

    def _match(self, target: str, names: set[str]) -> str:
        if target in names:
            return target
        hits = [n for n in names if n.endswith("." + target) or target.endswith("." + n)]
        if len(hits) == 1:
            return hits[0]
        raise CheckpointError(f"{self.weights.path}: adapter tensor for {target!r} matches "
                              f"{'no' if not hits else 'several'} tensors of the base model"
                              f"{'' if not hits else ': ' + ', '.join(sorted(hits)[:4])}")

    def names(self) -> list[str]:
        return [*self.modules, *self.replaced]

    def meta(self, name: str) -> TensorMeta:
        if name in self.replaced:
            return self.weights.meta(self.replaced[name])
        m = self.modules.get(name)
        if m is None:
            raise CheckpointError(f"{self.path}: adapter does not change {name!r}")
        a, b = self.weights.meta(m.a), self.weights.meta(m.b)
        shape = (b.shape[0], a.shape[1]) if not m.fan_in_fan_out else (a.shape[1], b.shape[0])
        return TensorMeta(name, b.dtype, shape, b.file)

    def delta(self, name: str) -> Tensor | None:
        """The task vector of ``name``: ``B @ A * scale`` in float32, or None if not adapted."""
        m = self.modules.get(name)
        if m is None:
            return None
        a = self.weights.load(m.a).float()
        b = self.weights.load(m.b).float()
        d = (b @ a).mul_(m.scale)
        return d.T.contiguous() if m.fan_in_fan_out else d

    def load(self, name: str, base: Tensor | None = None, *, pool: Any = None) -> Tensor:
        if name in self.replaced:
            return self.weights.load(self.replaced[name], pool=pool)
        if base is None:
            raise CheckpointError(f"{self.path}: a LoRA adapter needs the base tensor to give {name!r}")
        d = self.delta(name)
        if d is None:
            return base.clone()
        if tuple(d.shape) != tuple(base.shape):
            raise CheckpointError(f"{self.weights.path}: LoRA update of {name!r} has shape {list(d.shape)}, the "
                                  f"base tensor has {list(base.shape)}")
        return (base.float() + d).to(base.dtype)

    @property
    def config_dir(self) -> Path | None:
        return None

    def close(self) -> None:
        self.weights.close()


def _strip_peft(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf".*\.{key}", module):
            return value
    return default


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is a pickle-based file: loading it can run arbitrary code. Convert it to "
                           "safetensors, or set options.allow_pickle: true to load it with "
                           "torch.load(weights_only=True)")


def _sharded(path: Path, index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text())
        files = sorted(set(data["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shard {missing[0]} which does not exist in {path}")
    return [path / f for f in files]


def _check_index(ckpt: Checkpoint, index: Path) -> None:
    data = json.loads(index.read_text())
    for name, shard in data["weight_map"].items():
        if name not in ckpt:
            raise CheckpointError(f"{index} maps tensor {name!r} to {shard}, which does not hold it")


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False, job: str = "",
                    base_names: list[str] | None = None) -> Checkpoint:
    """Open the checkpoint at ``path`` (see the module docstring for the accepted layouts)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(p, [p])
        if p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(p)
            return PickleCheckpoint(p, [p])
        raise CheckpointError(f"{p}: unknown checkpoint format (expected .safetensors, or .bin/.pt with "
                              "allow_pickle)")
    if (p / "adapter_config.json").is_file():
        try:
            config = json.loads((p / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p / 'adapter_config.json'}: not valid JSON ({e})") from None
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (p / name).is_file():
                return LoraCheckpoint(p, open_checkpoint(p / name, allow_pickle=allow_pickle), config, base_names)
        raise CheckpointError(f"{p}: adapter_config.json without adapter_model.safetensors")
    if (p / "config.yaml").is_file() and (p / "jobs").is_dir():
        jobs = sorted(d.name for d in (p / "jobs").iterdir() if (d / "best.safetensors").is_file())
        want = job.replace("/", "__")
        if not job or want not in jobs:
            what = f"has no finished job {job!r}" if job else "is a polytask run directory; name the job"
            raise CheckpointError(f"{p} {what} (jobs: {', '.join(jobs) or 'none finished'})")
        return SafetensorsCheckpoint(p / "jobs" / want, [p / "jobs" / want / "best.safetensors"])
    if (p / "best.safetensors").is_file():
        return SafetensorsCheckpoint(p, [p / "best.safetensors"])
    index = p / "model.safetensors.index.json"
    if index.is_file():
        ckpt = SafetensorsCheckpoint(p, _sharded(p, index))
        _check_index(ckpt, index)
        return ckpt
    if (p / "model.safetensors").is_file():
        return SafetensorsCheckpoint(p, [p / "model.safetensors"])
    for pickled in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        if (p / pickled).is_file():
            if not allow_pickle:
                raise _refuse_pickle(p / pickled)
            files = _sharded(p, p / pickled) if pickled.endswith(".json") else [p / pickled]
            return PickleCheckpoint(p, files)
    single = sorted(p.glob("*.safetensors"))
    if len(single) == 1:
        return SafetensorsCheckpoint(p, single)
    raise CheckpointError(f"{p}: no model weights found (looked for model.safetensors, "
                          "model.safetensors.index.json, adapter_config.json, best.safetensors, pytorch_model.bin)")


def iter_config_files(directory: Path) -> Iterator[Path]:
    """The files of a model directory that describe it (config, tokenizer, ...) rather than hold weights."""
    for f in sorted(directory.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                and not f.name.startswith("."):
            yield f
