"""The streaming merge: for each tensor name, read it from every input, merge, write, free.

Whole models are never held: the peak is the current tensor from each of the N+1 inputs (as stored: a
bfloat16 model is never widened to float32 in memory; only the base is, as the output's accumulator), the
merge's block workspaces (and, for a trim, each worker's magnitude keys of one tensor), and (when
``prefetch`` allows) the next tensors being read in the background. Every check that can be made from the
headers (missing tensors, shapes, dtypes, vocabulary sizes) runs before any output exists; a failure later
(a corrupt byte range, a NaN or inf in an input or the output, a full disk) removes the partial output, so
a failed merge leaves nothing behind.

Vocabulary tensors are the input embedding and output head: a tensor whose first dimension is the base
config's ``vocab_size`` and whose name is an embedding or head (``embed_tokens``, ``wte``, ``lm_head``,
``output``, ...), or one matching ``options.vocab_tensors``. Only they may differ in their number of rows
(``options.vocab``); any other shape difference is a shape mismatch.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

import polytask
from polytask.errors import CheckpointError, ConfigError, DataError
from polytask.merging import ops
from polytask.merging.checkpoint import Checkpoint, iter_config_files, open_checkpoint
from polytask.merging.methods import (
    METHODS,
    MergeInputs,
    canonical_method,
    check_weights,
    data_free_setup,
    model_params_for,
    passes_of,
    run_passes,
)
from polytask.merging.tensorfile import itemsize
from polytask.merging.writer import ShardedWriter, parse_size

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}


class MergeOptions(BaseModel):
    """How inputs are read and checked (independent of the method)."""

    model_config = ConfigDict(extra="forbid")

    allow_pickle: bool = Field(False, description="load .bin/.pt inputs with torch.load(weights_only=True)")
    check_finite: bool = Field(True, description="fail on NaN or inf in any input tensor or merged tensor, "
                               "naming the file and tensor (false: merge the values as given)")
    vocab: Literal["error", "shared"] = Field(
        "error", description="inputs whose vocabulary tensors (input embedding, output head) have different "
        "numbers of rows: fail, or merge only the rows they share (the output keeps the shared rows and its "
        "config.json the shared vocab_size)")
    vocab_tensors: list[str] = Field(default_factory=list, description="regexes of tensor names that are "
                                     "vocabulary tensors (default: embedding and head names whose first "
                                     "dimension is the base config's vocab_size)")
    seed: int = Field(0, description="seed of random methods (DARE); each tensor's stream is derived from it")
    include: list[str] = Field(default_factory=list, description="regexes of tensor names to merge (default all)")
    exclude: list[str] = Field(default_factory=list, description="regexes of tensor names copied from the base")
    prefetch: int | str = Field("512MiB", description="bytes of upcoming tensors read ahead while merging, "
                                "with writes behind it on another thread (0: the lean mode, one tensor name at a "
                                "time: about N+1 tensors of that name in memory)")
    threads: int = Field(0, ge=0, description="worker threads that merge one tensor (0: one per CPU this process "
                         "may use, at most 8); torch's own kernel threads are 1 while merging")
    fsync: bool = Field(True, description="flush the output to disk before renaming it into place")
    compute_dtype: Literal["float32", "float64"] = Field("float32", description="dtype the merge computes in")


@dataclass
class ModelInput:
    """One model to merge: a checkpoint path, its weight and per-model parameter overrides."""

    path: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    job: str = ""


@dataclass
class _Plan:
    merged: list[str]
    copied: list[str]
    rows: dict[str, int]
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    input_bytes: int


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


_VOCAB_PARTS = {"embed", "embeds", "embedding", "embeddings", "embed_tokens", "embed_in", "embed_out", "wte",
                "word_embeddings", "tok_embeddings", "token_embedding", "lm_head", "output", "shared", "decoder",
                "head"}


def config_vocab_size(config_dir: Path | None) -> int | None:
    """``vocab_size`` of the model's ``config.json`` (or of its ``text_config``), if any."""
    cfg = _read_config(config_dir)
    for c in (cfg, cfg.get("text_config"), cfg.get("llm_config")):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return None


def _read_config(config_dir: Path | None) -> dict[str, Any]:
    if config_dir is None or not (config_dir / "config.json").is_file():
        return {}
    try:
        cfg = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def vocabulary_tensors(base: Checkpoint, patterns: Sequence[str] = ()) -> set[str]:
    """The base's input-embedding and output-head tensors: a tensor of a module named like one
    (``embed_tokens``, ``wte``, ``lm_head``, ``output``, ...) with the config's ``vocab_size`` rows, or one
    matching ``patterns``. Their rows are tokens, so checkpoints with extended vocabularies differ only there."""
    size = config_vocab_size(base.config_dir)
    out = set()
    for n in base.names():
        shape = base.meta(n).shape
        if not shape:
            continue
        module = n.rsplit(".", 2)[-2] if "." in n else n
        if _match(n, patterns) or (size is not None and shape[0] == size and module in _VOCAB_PARTS):
            out.add(n)
    return out


def _check_inputs(base: Checkpoint, models: Sequence[Checkpoint], opts: MergeOptions,
                  out_dtype: torch.dtype | None) -> _Plan:
    """Every check that the headers allow, before any tensor is read."""
    names = base.names()
    known = set(names)
    selected = [n for n in names if (not opts.include or _match(n, opts.include)) and not _match(n, opts.exclude)]
    for m in models:
        own = m.names()
        extra = [n for n in own if n not in known]
        if extra:
            raise CheckpointError(f"{m.meta(extra[0]).file}: tensor {extra[0]!r} is not in the base model {base.path}")
        if m.relative:
            continue
        have = set(own)
        for n in selected:
            if n not in have:
                raise CheckpointError(f"{m.path}: tensor {n!r} is missing (the base model {base.path} has it)")
    relative_names = [set(m.names()) if m.relative else set() for m in models]
    vocab = vocabulary_tensors(base, opts.vocab_tensors)
    merged, copied, rows, out = [], [], {}, {}
    input_bytes = 0
    for n in names:
        b = base.meta(n)
        floating = b.dtype.is_floating_point
        shape = b.shape
        if n in selected:
            for m, rel in zip(models, relative_names, strict=True):
                if m.relative and n not in rel:
                    continue
                t = m.meta(n)
                if t.dtype != b.dtype and not m.relative:
                    raise CheckpointError(f"{t.file}: tensor {n!r} is {t.dtype}, but {b.file} has {b.dtype}; convert "
                                          "the models to one dtype first")
                if t.shape != b.shape:
                    rows_only = len(t.shape) == len(b.shape) >= 1 and t.shape[1:] == b.shape[1:]
                    if not (rows_only and n in vocab):
                        raise CheckpointError(f"{t.file}: tensor {n!r} has shape {list(t.shape)}, but {b.file} has "
                                              f"{list(b.shape)}")
                    if opts.vocab != "shared":
                        raise CheckpointError(
                            f"mismatched vocabulary sizes: tensor {n!r} has {t.shape[0]} rows in {t.file} but "
                            f"{b.shape[0]} in {b.file}; set options.vocab: shared to merge only the shared rows")
                    rows[n] = min(rows.get(n, b.shape[0]), t.shape[0])
            if n in rows:
                shape = (rows[n], *b.shape[1:])
            if floating:
                merged.append(n)
            else:
                copied.append(n)
        else:
            copied.append(n)
        dtype = out_dtype if (out_dtype is not None and floating) else b.dtype
        out[n] = (dtype, tuple(shape))
        input_bytes += _nbytes(b.dtype, b.shape)
        if n in selected:
            for m in models:
                if not m.relative:
                    input_bytes += _nbytes(b.dtype, m.meta(n).shape)
    return _Plan(merged, copied, rows, out, input_bytes)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * itemsize(dtype)


class _Prefetcher:
    """Runs ``jobs`` in order on ``workers`` background threads, ahead of the consumer while the bytes held
    (read and not yet released) stay within ``budget``; one job always runs, however large. Two workers let
    one wait for the disk while the other converts what it has read."""

    def __init__(self, jobs: list[tuple[int, Callable[[], Any]]], budget: int, workers: int = 1) -> None:
        self.jobs, self.budget = jobs, budget
        self.cond = threading.Condition()
        self.results: dict[int, Any] = {}
        self.held = 0
        self.next = 0
        self.stop = False
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"polytask-merge-reader-{k}")
                        for k in range(max(1, workers))]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while (not self.stop and self.next < len(self.jobs) and self.held > 0
                       and self.held + self.jobs[self.next][0] > self.budget):
                    self.cond.wait()
                if self.stop or self.next >= len(self.jobs):
                    return
                i = self.next
                size, fn = self.jobs[i]
                self.next += 1
                self.held += size
            try:
                result: Any = fn()
            except BaseException as e:  # handed to the consumer, which raises it
                result = e
            with self.cond:
                self.results[i] = result
                if isinstance(result, BaseException):
                    self.stop = True
                self.cond.notify_all()

    def get(self, i: int) -> Any:
        with self.cond:
            while i not in self.results:
                self.cond.wait()
            r = self.results.pop(i)
        if isinstance(r, BaseException):
            raise r
        return r

    def release(self, size: int) -> None:
        with self.cond:
            self.held -= size
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()


class BufferPool:
    """Byte buffers of finished tensors handed to later tensors of the same size (a transformer repeats its
    shapes layer after layer), so the merge rarely allocates: a fresh large allocation is new pages, and their
    page faults cost more than the arithmetic done on them. Idle buffers are held up to ``max_bytes`` (the
    least recently returned size is dropped first); 0 disables the pool."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free: dict[int, list[Tensor]] = {}
        self.held = 0
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> Tensor:
        """A uint8 buffer of ``nbytes`` (contents undefined)."""
        with self.lock:
            stack = self.free.get(nbytes)
            if stack:
                self.held -= nbytes
                buf = stack.pop()
                if not stack:
                    del self.free[nbytes]
                return buf
        return torch.empty(nbytes, dtype=torch.uint8)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` backed by a pooled buffer."""
        return self.get(_nbytes(dtype, shape)).view(dtype).view(shape)

    def put(self, *tensors: Tensor) -> None:
        """Hand tensors back once nothing reads them any more (views of a larger buffer, and memory torch did not
        allocate, such as a mapped file's, are not pooled)."""
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            storage = t.untyped_storage()  # not resizable: memory torch does not own (a mapped tensor)
            if (self.max_bytes <= 0 or nbytes == 0 or nbytes > self.max_bytes or not t.is_contiguous()
                    or t.storage_offset() != 0 or storage.nbytes() != nbytes or not storage.resizable()):
                continue
            with self.lock:
                while self.held + nbytes > self.max_bytes and self.free:
                    oldest = next(iter(self.free))
                    self.held -= oldest
                    self.free[oldest].pop()
                    if not self.free[oldest]:
                        del self.free[oldest]
                self.free.setdefault(nbytes, []).append(t.reshape(-1).view(torch.uint8))
                self.free[nbytes] = self.free.pop(nbytes)  # most recently returned last
                self.held += nbytes

    def clear(self) -> None:
        """Drop every idle buffer."""
        with self.lock:
            self.free.clear()
            self.held = 0


def _shares(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _WriteBehind:
    """Writes merged tensors on a background thread while the next ones are merged (at most one waits);
    the tensors ``release`` names go back to the pool once written."""

    def __init__(self, writer: ShardedWriter, pool: BufferPool) -> None:
        self.writer = writer
        self.pool = pool
        self.queue: queue.Queue[tuple[str, Tensor, tuple[Tensor, ...]] | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="polytask-merge-writer")
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(item[0], item[1])
                    self.pool.put(*item[2])
                except BaseException as e:  # raised in the merging thread
                    self.error = e

    def put(self, name: str, tensor: Tensor, release: tuple[Tensor, ...] = ()) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, tensor, release))

    def close(self) -> None:
        """Wait for every queued write; raise the first write error."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


class _WriteNow:
    """Writes each merged tensor before the next is read (``prefetch: 0``, the lean mode)."""

    def __init__(self, writer: ShardedWriter, pool: BufferPool) -> None:
        self.writer = writer
        self.pool = pool

    def put(self, name: str, tensor: Tensor, release: tuple[Tensor, ...] = ()) -> None:
        self.writer.write(name, tensor)
        self.pool.put(*release)

    def close(self) -> None:
        """Nothing is pending."""


def _open_all(base: str | os.PathLike[str] | Checkpoint, models: Sequence[ModelInput | str | os.PathLike[str]],
              opts: MergeOptions, base_job: str = "") -> tuple[Checkpoint, list[Checkpoint], list[ModelInput]]:
    specs = [m if isinstance(m, ModelInput) else ModelInput(str(m)) for m in models]
    if not specs:
        raise ConfigError("models: give at least one model to merge")
    b = base if isinstance(base, Checkpoint) else open_checkpoint(base, allow_pickle=opts.allow_pickle, job=base_job)
    names = b.names()
    ckpts = [open_checkpoint(s.path, allow_pickle=opts.allow_pickle, job=s.job, base_names=names) for s in specs]
    return b, ckpts, specs


def merge_checkpoints(
    base: str | os.PathLike[str] | Checkpoint,
    models: Sequence[ModelInput | str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    params: dict[str, Any] | BaseModel | None = None,
    *,
    options: MergeOptions | dict[str, Any] | None = None,
    shard_size: int | str = "2GB",
    out_dtype: str = "auto",
    copy_files: bool = True,
    overwrite: bool = False,
    base_job: str = "",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Merge checkpoints tensor by tensor with a data-free method; write sharded safetensors to ``output``.

    Returns a summary (tensors merged/copied, bytes read/written, seconds). Raises CheckpointError or
    ConfigError naming the file and tensor on bad input, leaving no output.
    """
    t0 = time.perf_counter()
    opts = options if isinstance(options, MergeOptions) else MergeOptions.model_validate(options or {})
    method = canonical_method(method)
    entry = METHODS.get(method)
    if entry.extra.get("kind") != "data-free":
        raise ConfigError(f"method {method!r} is data-driven: it needs models polytask can run and their data; "
                          "use a suite experiment (polytask merge with a 'suite:' config)")
    p = METHODS.params_for(method, params, "params")
    if out_dtype != "auto" and out_dtype not in OUT_DTYPES:
        raise ConfigError(f"output.dtype {out_dtype!r}: expected auto or one of {', '.join(OUT_DTYPES)}")
    with ops.kernel_threads(opts.threads):
        b, ckpts, specs = _open_all(base, models, opts, base_job)
        try:
            mp = model_params_for(method, p, [s.params for s in specs])
            weights = [float(s.weight) for s in specs]
            check_weights(method, weights)
            if not entry.extra.get("uses_weights", True) and any(w != 1 for w in weights):
                raise ConfigError(f"method {method!r} computes its own coefficients; remove the models' weight")
            plan = _check_inputs(b, ckpts, opts, OUT_DTYPES.get(out_dtype))
            compute = OUT_DTYPES[opts.compute_dtype]
            check = opts.check_finite
            budget = parse_size(opts.prefetch)
            pool = BufferPool(budget)

            def convert(t: Tensor) -> Tensor:
                if t.dtype == compute:
                    return t if t.is_contiguous() else t.contiguous()
                out = pool.take(tuple(t.shape), compute).copy_(t)
                pool.put(t)
                return out

            def load(name: str) -> tuple[Tensor, list[Tensor]]:
                """The base in the compute dtype and the models as stored (methods read them widened)."""
                bt = b.load(name, pool=pool)
                ts = [m.load(name, base=bt, pool=pool) for m in ckpts]
                rows = plan.rows.get(name)
                if rows is not None:
                    bt, ts = bt[:rows], [t[:rows] for t in ts]
                if check:
                    for src, t in zip([b, *ckpts], [bt, *ts], strict=True):
                        if not all_finite(t):
                            file = src.meta(name).file if name in src else src.path
                            raise DataError(f"{file}: tensor {name!r} contains NaN or inf values (set "
                                            "options.check_finite: false to merge them as given)")
                return convert(bt), [t if t.is_contiguous() else t.contiguous() for t in ts]

            def stats_inputs(name: str, st: Any) -> MergeInputs:
                return MergeInputs(name, *load(name), weights, p, mp, opts.seed, st, consume=True, dtype=compute)

            passes = passes_of(method, p)
            stats = run_passes(passes, plan.merged, stats_inputs,
                               done=lambda inp: pool.put(inp.base, *inp.tensors))  # type: ignore[arg-type]
            # bytes a prefetched name holds: its inputs as stored, the base in the compute dtype, the output
            sizes = {n: _nbytes(b.meta(n).dtype, plan.out[n][1]) * (len(ckpts) + 1) + _nbytes(compute, plan.out[n][1])
                     + _nbytes(*plan.out[n]) for n in plan.out}
            meta = {"format": "pt", "polytask_merge_method": method}
            written = 0
            with ShardedWriter(output, [(n, *plan.out[n]) for n in plan.out], parse_size(shard_size), meta,
                               overwrite=overwrite, fsync=opts.fsync) as writer:
                if log is not None and writer.removed_stale:
                    stale = ", ".join(map(str, writer.removed_stale))
                    log(f"removed what killed merges left beside the output: {stale}")
                merged = set(plan.merged)
                # a model-wide trim cuts its tied entries in the order the tensors are merged: keep the stored order
                order = list(plan.out) if passes else merge_order(plan.out, sizes, budget)
                jobs = [(sizes[n], (lambda n=n: load(n)) if n in merged else (lambda n=n: b.load(n, pool=pool)))
                        for n in order]
                pf = _Prefetcher(jobs, budget, workers=2 if budget > 0 else 1)
                writes = _WriteBehind(writer, pool) if budget > 0 else _WriteNow(writer, pool)
                try:
                    for i, name in enumerate(order):
                        got = pf.get(i)
                        if name in merged:
                            bt, ts = got
                            held = [bt, *ts]
                            out = entry.build(MergeInputs(name, bt, ts, weights, p, mp, opts.seed, stats.get(name),
                                                          consume=True, dtype=compute))
                            del bt, ts
                        else:
                            held = [got]
                            out = got[:plan.rows[name]] if name in plan.rows else got
                        dtype, shape = plan.out[name]
                        final = out.contiguous() if out.dtype == dtype else pool.take(shape, dtype).copy_(out)
                        if check and final.is_floating_point() and not all_finite(final):
                            why = (f"the merge ({method}) or the cast to {final.dtype} overflowed" if name in merged
                                   else f"copied from {b.meta(name).file}")
                            raise DataError(f"{output}: merged tensor {name!r} contains NaN or inf values ({why})")
                        if not any(_shares(out, h) for h in held):
                            held.append(out)
                        after = tuple(h for h in held if _shares(h, final))
                        pool.put(*(h for h in held if not _shares(h, final)))
                        writes.put(name, final, after if after else (final,))
                        written += final.numel() * final.element_size()
                        del out, got, final, held
                        pf.release(jobs[i][0])
                        if log is not None and (i + 1) % max(1, len(plan.out) // 10) == 0:
                            log(f"merged {i + 1}/{len(plan.out)} tensors")
                finally:
                    pf.close()
                    writes.close()
                    pool.clear()
                    ops.release_workspaces()
                if copy_files and b.config_dir is not None:
                    for f in iter_config_files(b.config_dir):
                        if f.name == "config.json" and plan.rows:
                            writer.add_file(f.name, _shared_vocab_config(f, plan.rows))
                        elif f.name != "polytask_merge.json":
                            writer.copy_file(f)
                summary = {
                    "method": method, "params": p.model_dump(mode="json", by_alias=True),
                    "base": str(b.path), "models": [{"path": s.path, "weight": s.weight, "params": s.params,
                                                     **({"job": s.job} if s.job else {})} for s in specs],
                    "options": opts.model_dump(mode="json"), "tensors_merged": len(plan.merged),
                    "tensors_copied": len(plan.copied), "shared_rows": plan.rows, "shards": len(writer.files),
                    "polytask_version": polytask.__version__,
                }
                writer.add_file("polytask_merge.json", (json.dumps(summary, indent=2) + "\n").encode())
                out_path = writer.commit()
        finally:
            for c in (b, *ckpts):
                c.close()
    reads = 1 + len(passes)
    return {**summary, "output": str(out_path), "passes": reads, "input_bytes": plan.input_bytes * reads,
            "output_bytes": written, "seconds": time.perf_counter() - t0}


def merge_order(out: dict[str, tuple[torch.dtype, tuple[int, ...]]], sizes: dict[str, int], budget: int) -> list[str]:
    """The order the tensors are merged in: as stored, except that a tensor whose inputs and output take half
    the prefetch ``budget`` or more (``sizes``: bytes) comes right after the first one of the same dtype and
    shape (an LLM's output head after its input embedding). The buffers of such a tensor are too many for
    the pool, which keeps at most ``budget`` bytes of idle buffers, to hold while the tensors between the two
    are merged; merged next, the second reuses them instead of faulting in fresh pages (at 4 KiB a fault, a
    few hundred thousand faults for one large tensor of eight models). The output is the same in any order:
    each tensor is merged on its own and written at its planned place (DARE's streams are seeded by name)."""
    names = list(out)
    if budget <= 0:  # no pool: nothing to reuse
        return names
    order: list[str] = []
    placed: set[str] = set()
    for n in names:
        if n in placed:
            continue
        order.append(n)
        placed.add(n)
        if 2 * sizes[n] >= budget:
            same = [m for m in names if m not in placed and out[m] == out[n] and sizes[m] == sizes[n]]
            order += same
            placed.update(same)
    return order


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN or inf. A finite sum proves it in one fast reduction (NaN and inf propagate
    through a sum); only a non-finite sum (which an overflow can also give) needs the elementwise check."""
    if t.numel() == 0:
        return True
    try:
        if math.isfinite(float(t.sum())):
            return True
    except RuntimeError:  # dtypes without a sum kernel (float8)
        pass
    return bool(torch.isfinite(t).all())


def _shared_vocab_config(path: Path, rows: dict[str, int]) -> bytes:
    """The base's config.json with ``vocab_size`` (top level or in ``text_config``) set to the shared rows."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return path.read_bytes()
    if isinstance(cfg, dict) and rows:
        for c in (cfg, cfg.get("text_config"), cfg.get("llm_config")):
            if isinstance(c, dict) and "vocab_size" in c:
                c["vocab_size"] = min(rows.values())
    return (json.dumps(cfg, indent=2) + "\n").encode()


def _with_stats(inp: MergeInputs, stats: Any) -> MergeInputs:
    inp.stats = stats
    inp.consume = True
    return inp


def merge_state_dicts(method: str, base: dict[str, Tensor] | None, models: Sequence[dict[str, Tensor]],
                      params: dict[str, Any] | BaseModel | None = None, weights: Sequence[float] | None = None,
                      model_params: Sequence[dict[str, Any]] | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Merge in-memory state dicts with a data-free method (every floating tensor; others from the base).
    Inputs are not modified."""
    method = canonical_method(method)
    entry, p, mp, w = data_free_setup(method, params, weights, model_params, len(models))
    ref = base if base is not None else models[0]
    for i, m in enumerate(models):
        for name in ref:
            if name not in m:
                raise CheckpointError(f"model {i}: tensor {name!r} is missing")
            if m[name].shape != ref[name].shape:
                raise CheckpointError(f"model {i}: tensor {name!r} has shape {list(m[name].shape)}, expected "
                                      f"{list(ref[name].shape)}")

    def inputs(name: str) -> MergeInputs:
        f32 = torch.float32
        return MergeInputs(name, None if base is None else base[name].to(f32, copy=True),
                           [m[name].to(f32, copy=True) for m in models], w, p, mp, seed)

    names = [n for n in ref if ref[n].is_floating_point()]
    out = {}
    with ops.kernel_threads():
        stats = run_passes(passes_of(method, p), names, lambda n, st: _with_stats(inputs(n), st))
        try:
            for name, t in ref.items():
                if name in names:
                    inp = inputs(name)
                    inp.stats = stats.get(name)
                    inp.consume = True
                    out[name] = entry.build(inp).to(t.dtype)
                else:
                    out[name] = t.clone()
        finally:
            ops.release_workspaces()
    return out
