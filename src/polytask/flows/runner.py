"""The job runner every flow shares: a run directory opened and locked (``open_run``, ``releases_run_locks``),
its suite built with the preprocessing saved (``run_suite``), and jobs executed (``execute``): read back when
finished, copied from the single-task result cache when there, else trained (resuming their checkpoint).

Layout of a run directory::

    config.yaml        the resolved configuration
    preprocessing.json the fitted input/target standardisation and class labels (``TaskSuite.preprocessing``)
    metrics.jsonl      one line per job, epoch, split and task
    summary.json       test metrics at the best-validation epoch, Δm%, mean rank, wall time, versions
    report.html        a self-contained page
    run.json           when the run started
    run.lock           held by the one process working in the directory (its pid)
    jobs/<job>/        last.safetensors (resumable state), best.safetensors (weights), result.json, timing.json

The directory and its ``config.yaml`` exist from the start (before any data is read), so a run killed at
any moment can be resumed; a directory in which nothing has trained yet (e.g. the data failed to load) is
started again, with the new config, by a plain run with the same ``output.name``.

Under torchrun (data-parallel training, :mod:`polytask.engine.distributed`) rank 0 opens, locks and writes the run
directory and decides what each job needs (read back, copied from the cache, or trained); the other ranks follow its
decisions (broadcast), train every job with it, and write nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

import polytask
from polytask.config import Config, MethodConfig, check, dump_config, load_config
from polytask.engine import distributed, faults
from polytask.engine.hooks import Hook, Run
from polytask.engine.progress import Reporter
from polytask.engine.spec import CHECKPOINT
from polytask.errors import CheckpointError, ConfigError
from polytask.flows.jobs import Job, train_configured
from polytask.io import (
    DirLock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    is_temporary,
    remove_stale_temporaries,
)
from polytask.tasks import build_suite
from polytask.tasks.task import Task, TaskSuite

STL = "stl"
LOCK = "run.lock"
# what a run writes before its first training step: a directory holding only these has never trained
_START_FILES = frozenset({"config.yaml", "run.json", LOCK, "preprocessing.json"})


def single_task_job(task: str) -> Job:
    """The single-task baseline of ``task`` (same backbone and budget, one head)."""
    return Job(f"{STL}/{task}", (task,), MethodConfig(name="equal"), "single_task")


@functools.cache
def code_version() -> str:
    """A digest of the installed polytask sources and of the library versions that compute the numbers:
    any code change gives a new value (``__version__`` alone does not move between releases)."""
    root = Path(polytask.__file__).parent
    h = hashlib.blake2b(json.dumps(versions(), sort_keys=True).encode(), digest_size=16)
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


_digests: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}


def _tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and bytes, computed once per tensor object."""
    hit = _digests.get(id(t))
    if hit is not None and hit[0]() is t:
        return hit[1]
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    key = id(t)
    _digests[key] = (weakref.ref(t, lambda _, k=key: _digests.pop(k, None)), h.hexdigest())
    return _digests[key][1]


def _canonical(obj: Any) -> Any:
    """``obj`` as JSON-able data that changes whenever obj does: tensors and arrays by digest, dataclasses
    by their fields, functions by qualified name."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": _tensor_digest(obj)}
    if isinstance(obj, np.ndarray):
        return {"array": _tensor_digest(torch.from_numpy(np.ascontiguousarray(obj)))}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {type(obj).__name__: {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {"dict": [[_canonical(k), _canonical(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    return repr(obj)


def data_fingerprint(suite: TaskSuite, tasks: tuple[str, ...]) -> str:
    """A digest of everything the suite gives a job on ``tasks``: every split's input, target and row-index
    tensors (so the file's content and the split, not its path), the task definitions (kinds, metrics,
    class labels, target scaling), the input scaling and the suite's info."""
    blob = json.dumps(_canonical(suite.subset(tasks)), sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def files_digest(path: str) -> str:
    """A digest of a file's bytes, or of every file below a directory (relative names and bytes); each file's is
    computed once per (path, size, modification time)."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0".encode())
        h.update(_file_digest(str(f), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def result_cache_key(job: Job, suite: TaskSuite, config: Config, split_seed: int | None = None) -> str:
    """The single-task result cache key: everything that determines the job's result. The data it sees
    (content, split, preprocessing), the seed the split was drawn with (``split_seed``, default
    ``config.seed``), the training seed and job id (the job's seed offset), the suite parameters, model and
    training config, the starting weights' bytes (``model.init_from``), the bytes of files and directories the
    backbone parameters name (an ``hf`` model directory: the same path with other weights is another model) and
    the code version."""
    init = config.model.init_from
    blob = json.dumps({
        "data": data_fingerprint(suite, job.tasks),
        "split_seed": config.seed if split_seed is None else split_seed, "seed": config.seed,
        "job": [job.id, job.kind, job.method.model_dump(mode="json")],
        "suite": config.suite.model_dump(mode="json"), "model": config.model.model_dump(mode="json"),
        "init_from": hashlib.blake2b(Path(init).read_bytes()).hexdigest() if init else None,
        "model_files": {k: files_digest(v) for k, v in config.model.backbone_params.items()
                        if isinstance(v, str) and Path(v).expanduser().exists()},
        "train": config.train.model_dump(mode="json"), "code": code_version(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def job_dir_of(run_dir: Path, job: Job) -> Path:
    return run_dir / "jobs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", job.id.replace("/", "__"))


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "polytask": polytask.__version__}


def summary_header(config: Config, suite: TaskSuite, run_id: str, started: str, wall_time: float) -> dict[str, Any]:
    """What every summary.json of a configured run starts with (see ``header``)."""
    return header(suite.name, config.suite.params, suite.tasks, config.seed, run_id, started, wall_time)


def header(suite_name: str, suite_params: dict[str, Any], tasks: Sequence[Task], seed: int, run_id: str,
           started: str, wall_time: float) -> dict[str, Any]:
    """What every summary.json starts with: versions, run id, the suite and its tasks' metrics, seed, times."""
    return {
        "polytask_version": polytask.__version__, "run_id": run_id,
        "suite": {"name": suite_name, "params": suite_params,
                  "tasks": [{"name": t.name, "kind": t.kind, "n_outputs": t.n_outputs,
                             "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better}
                                         for m in t.metrics]} for t in tasks]},
        "seed": seed, "versions": versions(), "started": started, "wall_time_s": wall_time,
    }


def execute(job: Job, suite: TaskSuite, config: Config, run_dir: Path, reporter: Reporter,
            hooks: Sequence[Hook] = (), split_seed: int | None = None) -> dict[str, Any]:
    """A job's result: read if finished, copied from the single-task cache if there, else trained
    (resuming its checkpoint if one exists), with ``hooks`` riding on it; single-task results go into the cache.
    ``split_seed`` is the seed ``suite`` was built with when it is not ``config.seed`` (a comparison over
    training seeds)."""
    job_dir = job_dir_of(run_dir, job)
    done = job_dir / "result.json"
    comm = distributed.current()
    writes = distributed.is_writer(comm)
    cached = None
    if writes and job.kind == "single_task" and config.baselines.cache and not done.exists():
        cached = cache_dir() / "stl" / result_cache_key(job, suite, config, split_seed)
    if cached is not None and (cached / "result.json").exists():
        _copy_result(cached, job_dir)
        reporter.log(f"[{job.id}] single-task result reused from cache {cached}")
    finished = json.loads(done.read_text()) if writes and done.exists() else None
    if comm is not None:  # every rank trains the job, or none does: rank 0 decides
        finished = comm.broadcast(finished)
    if finished is not None:
        return finished
    job_dir.mkdir(parents=True, exist_ok=True)
    result = train_configured(job, suite, config, job_dir, reporter, hooks)
    if writes:
        atomic_write_json(done, result)
    if cached is not None:
        _copy_result(job_dir, cached)
    return result


class EpochCallback(Hook):
    """A hook that calls ``fn(history)`` after every epoch with the job's records so far (e.g. to rewrite
    ``metrics.jsonl``); it keeps no state."""

    name = "epoch_callback"

    def __init__(self, fn: Callable[[list[dict[str, Any]]], None]) -> None:
        self.fn = fn

    def on_epoch(self, run: Run, epoch: int) -> None:
        self.fn(run.state.history)


def _copy_result(src: Path, dst: Path) -> None:
    """Copy a finished job's weights, then its result (the marker of completion), each atomically."""
    for name in ("best.safetensors", "result.json"):
        atomic_write_bytes(dst / name, (src / name).read_bytes())


_held: dict[Path, DirLock] = {}
P = ParamSpec("P")
R = TypeVar("R")


def lock_run(run_dir: Path) -> None:
    """Hold ``run_dir``'s lock (RunLockedError naming the holder's pid if another live process has it)."""
    key = run_dir.resolve()
    if key not in _held:
        _held[key] = DirLock(run_dir, LOCK).acquire()


def close_run(run_dir: str | os.PathLike[str]) -> None:
    """Give up this process's lock on ``run_dir`` (if it holds it)."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def releases_run_locks(flow: Callable[P, R]) -> Callable[P, R]:
    """Decorate a flow so that the run-directory locks it took (``open_run``) are given up when it returns
    or fails; a killed process loses its locks with it."""
    @functools.wraps(flow)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        before = set(_held)
        try:
            return flow(*args, **kwargs)
        finally:
            for key in set(_held) - before:
                close_run(key)
    return wrapper


def never_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` is empty, or a run directory in which nothing has trained or finished: only the
    files a run writes before its first step, temporaries, and job folders without a checkpoint (results
    copied from the single-task cache come back from the cache)."""
    entries = [p for p in run_dir.iterdir() if p.name != LOCK and not is_temporary(p)]
    if entries and not (run_dir / "config.yaml").is_file():
        return False
    return all(p.name in _START_FILES or (p.name == "jobs" and p.is_dir() and not any(p.glob(f"*/{CHECKPOINT}")))
               for p in entries)


def _new_run_dir(config: Config) -> Path:
    """The run directory of ``config``, created and locked; one in which nothing has trained is emptied and
    reused (its start failed, e.g. on bad data), anything else is refused."""
    name = config.output.name or f"{config.suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.output.dir) / name
    refusal = ConfigError(f"run directory {run_dir} already exists and holds trained jobs or results; use "
                          f"--resume {run_dir} to continue it, or set output.name")
    if run_dir.exists() and not never_trained(run_dir):
        raise refusal
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run(run_dir)
    if not never_trained(run_dir):  # another process started it in the meantime
        close_run(run_dir)
        raise refusal
    for p in run_dir.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return run_dir


def reopen_run(run_dir: Path) -> Path:
    """An existing run directory to resume: checked to be one (its config.yaml), locked for this process, and rid of
    the temporaries of killed writers."""
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    lock_run(run_dir)
    remove_stale_temporaries(run_dir)
    return run_dir


def open_run(config: Config | None, resume: str | os.PathLike[str] | None) -> tuple[Path, Config, dict[str, Any]]:
    """A new run directory for ``config`` (its resolved config saved), or the existing one at ``resume``
    with its saved config; returns (run directory, config, run state). The directory is locked for this
    process until its flow ends (``releases_run_locks``); a resumed one loses the temporaries of killed
    writers. The config is saved before any data is read, so a run killed at any moment can be resumed.

    Under torchrun, rank 0 does this and the other ranks open the directory it names (any error it met is raised on
    every rank)."""
    comm = distributed.init_from_env()
    if comm is not None and comm.rank != 0:
        return _follow_run(comm)
    run_dir = Path(resume) if resume is not None else None
    try:
        if run_dir is not None:
            reopen_run(run_dir)
            config = load_config(run_dir / "config.yaml")
            state = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        else:
            config = check(config) if config is not None else load_config()
            run_dir = _new_run_dir(config)
            atomic_write_text(run_dir / "config.yaml", dump_config(config))
            state = {}
        state.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        atomic_write_json(run_dir / "run.json", state)
    except BaseException as e:
        if run_dir is not None:
            close_run(run_dir)
        if comm is not None:
            comm.broadcast(e)
        raise
    if comm is not None:
        comm.broadcast(str(run_dir))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    faults.hit("start")
    return run_dir, config, state


def open_regime_run(config: Any, resume: str | os.PathLike[str] | None, default_name: str,
                    load: Callable[[Path], Any], dump: Callable[[Any], str], needs: str) -> tuple[Path, Any]:
    """The run directory of a regime with its own config (continual, icl): the one at ``resume``, reopened with its
    saved config, or a new one ``config.output.dir / (config.output.name or default_name)``, locked, with the config
    written by ``dump``; ``needs`` is the error when neither a config nor ``resume`` is given. An existing directory
    with a config is refused (resume it, or name another)."""
    if resume is not None:
        run_dir = reopen_run(Path(resume))
        return run_dir, load(run_dir / "config.yaml")
    if config is None:
        raise ConfigError(needs)
    run_dir = Path(config.output.dir) / (config.output.name or default_name)
    if (run_dir / "config.yaml").exists():
        raise ConfigError(f"run directory {run_dir} already exists; use --resume {run_dir} to continue it, or set "
                          "output.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run(run_dir)
    atomic_write_text(run_dir / "config.yaml", dump(config))
    return run_dir, config


def _follow_run(comm: distributed.Collective) -> tuple[Path, Config, dict[str, Any]]:
    """A non-zero rank's :func:`open_run`: the directory rank 0 opened, read without locking or writing."""
    opened = comm.broadcast(None)
    if isinstance(opened, BaseException):
        raise opened
    run_dir = Path(opened)
    config = load_config(run_dir / "config.yaml")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    return run_dir, config, json.loads((run_dir / "run.json").read_text())


def run_suite(config: Config, run_dir: Path) -> TaskSuite:
    """The configured suite, its fitted preprocessing (scalers, class labels) saved beside config.yaml."""
    suite = build_suite(config.suite.name, config.suite.params, config.seed)
    if distributed.is_writer():
        atomic_write_json(run_dir / "preprocessing.json", suite.preprocessing())
    return suite


