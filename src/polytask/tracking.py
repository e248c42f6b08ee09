"""Experiment trackers: MLflow and TensorBoard, riding on every job of a run as hooks.

What a run logs, in each tracker's own format and with its own writer (``mlflow.MlflowClient``;
``torch.utils.tensorboard.SummaryWriter``):

- the run's config: MLflow params (the config flattened to ``a.b.c`` keys) and ``config.yaml`` as an artifact of
  the run; TensorBoard text ``config`` in the sub-run ``_run``;
- per job (an MLflow child run of the run, a TensorBoard sub-run ``<job>``), per epoch, at the global step
  reached at its end: the per-task training losses and the weights the method used (``train/<task>/loss``,
  ``train/<task>/weight``), the per-task validation loss and metrics (``val/<task>/<metric>``); at the end the
  test scores of the kept epoch (``test/<task>/<metric>``, at the job's last step). These are the records of
  ``metrics.jsonl`` (the loop's ``LoopState.history``), value for value;
- the run's summary at the end: per method label, the test metrics, Δm% (overall and per task) and the mean rank
  (``summary/<label>/...``, step 0), and ``summary.json`` (an MLflow artifact; TensorBoard text ``summary``).

``polytask continual`` logs the same way: a sub-run per experience's job (``<strategy>-s<seed>/e<i>``; its steps
count from 0 in each experience, no test split), and the study's metrics per strategy and seed as its summary.

Each tracker logs each (name, step) once, also across a kill and resume: a hook's checkpointed state is the last
epoch it logged (epochs before the checkpoint are not logged again), and the first time a job logs in a process it
reads back what the tracker already holds and leaves that out (the epoch logged just before a kill, ahead of the
checkpoint that would have recorded it; a job finished or taken from the single-task cache in an earlier process).
Resumed runs train bit for bit as uninterrupted ones, so a value left out equals the one that would be logged.

Where jobs train in other processes (the Ray executor pickles hooks to its workers), a hook's copy opens its own
MLflow client or TensorBoard writer there (backends pickle without them) and logs the epochs; the process that holds
the run logs each finished job's test scores (and anything missing) and the summary.

Deliberate choices: TensorBoard scalars are written as double-precision tensors (``new_style=True,
double_precision=True``) so they read back exactly (the classic ``simple_value`` is float32); a local MLflow
directory is MLflow's file store, which MLflow 3 keeps in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``:
polytask sets it to ``true`` for that case unless it is set already (a database or server URI needs nothing).
MLflow params longer than MLflow's limit (6000 characters) are cut, marked with ``...``; the artifact holds all.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from polytask.engine.distributed import is_writer
from polytask.engine.hooks import Hook, Run
from polytask.errors import ConfigError

EXTRA = "pip install 'polytask[track]'"
_RECORD_KEYS = frozenset({"job", "epoch", "step", "split", "task"})
_MAX_PARAM = 6000


# ---------------------------------------------------------------- pure functions


def clean(part: str) -> str:
    """One part of a metric name as MLflow and TensorBoard accept it: other characters than letters, digits,
    ``_ . - `` and space become ``_`` (and a part of only dots too)."""
    out = re.sub(r"[^\w.\- ]", "_", str(part))
    return "_" if not out or set(out) == {"."} else out


def metric_name(*parts: str) -> str:
    """The name of a logged value: its cleaned parts joined by ``/``."""
    return "/".join(clean(p) for p in parts)


def epoch_metrics(records: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """The values of history records (``metrics.jsonl`` lines) by step: ``{step: {split/task/name: value}}``."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        row = out.setdefault(int(r["step"]), {})
        for k, v in r.items():
            if k not in _RECORD_KEYS and isinstance(v, int | float) and not isinstance(v, bool):
                row[metric_name(r["split"], r["task"], k)] = float(v)
    return out


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a run's ``summary.json`` (a continual study's: :func:`continual_summary_metrics`): per method
    label its test metrics, Δm% (overall and per task) and mean rank, named ``summary/<label>/<task>/<metric>``,
    ``summary/<label>/delta_m``, ``summary/<label>/<task>/delta_m`` and ``summary/<label>/mean_rank``."""
    if summary.get("kind") == "continual":
        return continual_summary_metrics(summary)
    out: dict[str, float] = {}
    for label, r in summary.get("results", {}).items():
        for task, scores in r.get("tasks", {}).items():
            for m, v in scores.items():
                out[metric_name("summary", label, task, m)] = float(v)
        if r.get("delta_m") is not None:
            out[metric_name("summary", label, "delta_m")] = float(r["delta_m"])
            for task, v in (r.get("delta_m_per_task") or {}).items():
                out[metric_name("summary", label, task, "delta_m")] = float(v)
    for label, v in (summary.get("mean_rank") or {}).items():
        out[metric_name("summary", label, "mean_rank")] = float(v)
    return out


def continual_summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a continual study's ``summary.json``: per strategy label and seed, the metrics of its accuracy
    matrix (average accuracy, BWT, FWT, forgetting, intransigence: those it has), named
    ``summary/<label>/s<seed>/<metric>``."""
    return {metric_name("summary", label, f"s{r['seed']}", m): float(v)
            for label, runs in summary.get("results", {}).items() for r in runs
            for m, v in r.get("metrics", {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A config tree as flat ``a.b.0.c`` keys with string values, the shape of MLflow params: mappings and lists
    holding mappings go down a level (a list by index), other values are JSON (strings as they are)."""
    if isinstance(tree, Mapping) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list | tuple) and any(isinstance(x, Mapping | list | tuple) for x in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    value = tree if isinstance(tree, str) else json.dumps(tree)
    return {prefix[:-1]: value if len(value) <= _MAX_PARAM else value[:_MAX_PARAM - 3] + "..."}


def new_values(metrics: Mapping[int, Mapping[str, float]], logged: set[tuple[str, int]]
               ) -> dict[int, dict[str, float]]:
    """``metrics`` less the (name, step) pairs a tracker already holds (steps left empty are dropped)."""
    out = {s: {k: v for k, v in row.items() if (k, s) not in logged} for s, row in metrics.items()}
    return {s: row for s, row in out.items() if row}


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _require(module: str, key: str) -> Any:
    """Import an optional dependency, or a ConfigError naming the config key and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key}: needs {module.split('.')[0]}, which cannot be imported ({e}); install the "
                          f"trackers with {EXTRA}") from None


# ---------------------------------------------------------------- backends


class Backend(Protocol):
    """One tracker: a run with its config, jobs with values by step, and the run's summary. Every call is
    idempotent on what the tracker holds (``logged`` tells callers what to leave out)."""

    name: str

    def open_job(self, job: str, params: Mapping[str, str]) -> None:
        """Start (or find again) the job's sub-run, with its parameters."""

    def logged(self, job: str) -> set[tuple[str, int]]:
        """The (name, step) pairs the job's sub-run already holds."""
        ...

    def log(self, job: str, metrics: Mapping[int, Mapping[str, float]]) -> None:
        """Log ``{step: {name: value}}`` to the job's sub-run."""

    def end_job(self, job: str) -> None:
        """The job is finished: close its sub-run."""

    def finish(self, summary: Mapping[str, Any], summary_path: Path) -> None:
        """Log the run's summary (its numbers and the file) and close the run."""


class MLflowBackend:
    """MLflow: an experiment, a run per polytask run (params: the flattened config; artifacts: config.yaml and
    summary.json; tag ``polytask.run``), a child run per job (tags ``mlflow.parentRunId``, ``polytask.parent``,
    ``polytask.job``: digests of the run and the job id), found again on resume by these tags. It pickles
    without its client (a job trained in another process, e.g. a Ray worker, opens its own)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_key: str) -> None:
        if "://" not in uri and ":" not in uri.split("/")[0]:  # a local directory: MLflow's file store
            uri = Path(uri).expanduser().resolve().as_uri()
        self.uri, self.experiment_name, self.run_key = uri, experiment, run_key
        self.experiment = self.run_id = ""
        self.jobs: dict[str, str] = {}
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "_client"} | {"_client": None}

    @property
    def client(self) -> Any:
        """The MLflow client of this process (created on first use)."""
        if self._client is None:
            if self.uri.startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow = _require("mlflow", "track.mlflow")
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        return self._client

    def start(self, run_name: str, config: Mapping[str, Any], config_path: Path) -> None:
        """Find or create the experiment and the run; log the config (params and the file)."""
        client = self.client
        found = client.get_experiment_by_name(self.experiment_name)
        if found is None:
            try:
                self.experiment = client.create_experiment(self.experiment_name)
            except Exception:  # created meanwhile by another process
                self.experiment = client.get_experiment_by_name(self.experiment_name).experiment_id
        else:
            self.experiment = found.experiment_id
        self.run_id = self._find_or_create({"polytask.run": self.run_key}, run_name)
        self._params(self.run_id, flatten(config))
        client.log_artifact(self.run_id, str(config_path))

    def _find_or_create(self, tags: dict[str, str], name: str) -> str:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items() if k.startswith("polytask."))
        found = self.client.search_runs([self.experiment], filter_string=query, max_results=1)
        if found:
            return str(found[0].info.run_id)
        return str(self.client.create_run(self.experiment, tags=tags, run_name=name).info.run_id)

    def _params(self, run_id: str, params: Mapping[str, str]) -> None:
        entities = _require("mlflow.entities", "track.mlflow")
        items = [entities.Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def open_job(self, job: str, params: Mapping[str, str]) -> None:
        """Find or create the job's child run; log its parameters."""
        if job not in self.jobs:
            tags = {"polytask.parent": self.run_key, "polytask.job": _digest(job), "mlflow.parentRunId": self.run_id}
            self.jobs[job] = self._find_or_create(tags, job)
            self._params(self.jobs[job], params)

    def logged(self, job: str) -> set[tuple[str, int]]:
        """Every (metric, step) of the job's child run."""
        run_id = self.jobs[job]
        keys = self.client.get_run(run_id).data.metrics
        return {(k, int(m.step)) for k in keys for m in self.client.get_metric_history(run_id, k)}

    def log(self, job: str, metrics: Mapping[int, Mapping[str, float]]) -> None:
        """One ``log_batch`` (per 1000 values) of the values with their steps."""
        self.open_job(job, {})  # a copy of this backend in another process finds the child run
        now, entities = int(time.time() * 1000), _require("mlflow.entities", "track.mlflow")
        items = [entities.Metric(k, v, now, s) for s, row in metrics.items() for k, v in row.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.jobs[job], metrics=items[i:i + 1000])

    def end_job(self, job: str) -> None:
        """Mark the job's child run finished."""
        self.client.set_terminated(self.jobs.pop(job), "FINISHED")

    def finish(self, summary: Mapping[str, Any], summary_path: Path) -> None:
        """The summary's numbers (those not logged yet) at step 0, summary.json as an artifact; run finished."""
        held = self.client.get_run(self.run_id).data.metrics
        now, entities = int(time.time() * 1000), _require("mlflow.entities", "track.mlflow")
        items = [entities.Metric(k, v, now, 0) for k, v in summary_metrics(summary).items() if k not in held]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
        self.client.log_artifact(self.run_id, str(summary_path))
        self.client.set_terminated(self.run_id, "FINISHED")


def read_tensorboard(path: Path) -> dict[str, dict[int, Any]]:
    """What TensorBoard's own reader (``EventAccumulator``, every event kept) finds in the event files of one
    sub-run: ``{tag: {step: value}}``, scalars as floats (double-precision ones exactly), text as a string.
    A step logged twice keeps the last value (see :func:`tensorboard_counts` to count them)."""
    return {tag: {s: v for s, v in events} for tag, events in _tensorboard_events(path).items()}


def tensorboard_counts(path: Path) -> dict[str, dict[int, int]]:
    """How many times each (tag, step) occurs in a sub-run's event files."""
    out: dict[str, dict[int, int]] = {}
    for tag, events in _tensorboard_events(path).items():
        counts = out.setdefault(tag, {})
        for s, _ in events:
            counts[s] = counts.get(s, 0) + 1
    return out


def _tensorboard_events(path: Path) -> dict[str, list[tuple[int, Any]]]:
    if not path.is_dir():
        return {}
    acc = _require("tensorboard.backend.event_processing.event_accumulator", "track.tensorboard")
    util = _require("tensorboard.util.tensor_util", "track.tensorboard")
    ea = acc.EventAccumulator(str(path), size_guidance={acc.TENSORS: 0, acc.SCALARS: 0})
    ea.Reload()
    out: dict[str, list[tuple[int, Any]]] = {}
    for tag in ea.Tags()["tensors"]:
        events = []
        for e in ea.Tensors(tag):
            value = util.make_ndarray(e.tensor_proto)
            events.append((int(e.step), value.item().decode() if value.dtype == object and value.size == 1
                           else float(value) if value.size == 1 else value.tolist()))
        out[tag] = events
    for tag in ea.Tags()["scalars"]:
        out[tag] = [(int(e.step), float(e.value)) for e in ea.Scalars(tag)]
    return out


class TensorBoardBackend:
    """TensorBoard event files under ``<dir>/<run>``: a sub-run per job (``/`` in a job id becomes ``__``) and
    ``_run`` for the config and the summary; written with ``torch.utils.tensorboard.SummaryWriter``."""

    name = "tensorboard"

    def __init__(self, directory: str, run_name: str) -> None:
        self.root = Path(directory).expanduser().resolve() / clean(run_name)
        self.writers: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "writers": {}}

    @staticmethod
    def writer(path: Path) -> Any:
        """A ``SummaryWriter`` on ``path`` (TensorBoard's event files, a new file per writer)."""
        _require("tensorboard.backend.event_processing.event_accumulator", "track.tensorboard")
        return _require("torch.utils.tensorboard", "track.tensorboard").SummaryWriter(str(path))

    def start(self, config_yaml: str) -> None:
        """The run's config as text in ``_run`` (once)."""
        if "config/text_summary" not in read_tensorboard(self.root / "_run"):
            with self.writer(self.root / "_run") as w:
                w.add_text("config", "```\n" + config_yaml + "```", 0)

    def path(self, job: str) -> Path:
        """The job's sub-run directory."""
        return self.root / clean(job.replace("/", "__"))

    def open_job(self, job: str, params: Mapping[str, str]) -> None:
        """Open the job's writer (its parameters go to MLflow only; TensorBoard has the run's config)."""
        if job not in self.writers:
            self.writers[job] = self.writer(self.path(job))

    def logged(self, job: str) -> set[tuple[str, int]]:
        """Every (tag, step) in the job's sub-run, as TensorBoard reads it."""
        return {(tag, s) for tag, steps in read_tensorboard(self.path(job)).items() for s in steps}

    def log(self, job: str, metrics: Mapping[int, Mapping[str, float]]) -> None:
        """Each value as a double-precision scalar at its step, then flushed (a kill loses nothing logged)."""
        self.open_job(job, {})  # a copy of this backend in another process opens its own writer
        w = self.writers[job]
        for s, row in metrics.items():
            for k, v in row.items():
                w.add_scalar(k, v, s, new_style=True, double_precision=True)
        w.flush()

    def end_job(self, job: str) -> None:
        """Close the job's writer."""
        w = self.writers.pop(job, None)
        if w is not None:
            w.close()

    def finish(self, summary: Mapping[str, Any], summary_path: Path) -> None:
        """The summary's numbers (those not logged yet) as scalars at step 0 and its JSON as text, in ``_run``."""
        held = read_tensorboard(self.root / "_run")
        with self.writer(self.root / "_run") as w:
            for k, v in summary_metrics(summary).items():
                if k not in held:
                    w.add_scalar(k, v, 0, new_style=True, double_precision=True)
            if "summary/text_summary" not in held:
                w.add_text("summary", "```\n" + json.dumps(summary, indent=1) + "\n```", 0)


# ---------------------------------------------------------------- the hook and the run's trackers


class TrackerHook(Hook):
    """Logs a job's epochs to one tracker as they end (``on_epoch``); its checkpointed state is the last epoch
    logged. The first time it logs in a process it leaves out what the tracker already holds. It opens the job's
    sub-run in ``init``, in the process that trains the job."""

    def __init__(self, backend: Backend, job: str, params: Mapping[str, str]) -> None:
        self.backend, self.job, self.params = backend, job, dict(params)
        self.name = f"track_{backend.name}"
        self.epoch = 0
        self.checked = False

    def init(self, run: Run) -> None:
        """Open the job's sub-run; a job starting from scratch has logged nothing (a resumed one gets its state
        next)."""
        self.backend.open_job(self.job, self.params)
        self.epoch = 0

    def state_dict(self) -> dict[str, int]:
        """The last epoch logged."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Any) -> None:
        """Resume: epochs up to the checkpoint's are logged."""
        self.epoch = int(state["epoch"])

    def send(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Log records (history lines), first leaving out what the tracker holds if this process has not looked."""
        metrics = epoch_metrics(records)
        if not self.checked:
            metrics = new_values(metrics, self.backend.logged(self.job))
            self.checked = True
        if metrics:
            self.backend.log(self.job, metrics)

    def on_epoch(self, run: Run, epoch: int) -> None:
        """Log the epochs of the history not logged yet (this one, after a resume also those since the
        checkpoint's)."""
        self.send([r for r in run.state.history if self.epoch < r["epoch"] <= epoch and r["split"] != "test"])
        self.epoch = epoch


class Trackers:
    """The trackers a run's ``track`` section turns on (none: every call does nothing). A flow asks ``hooks(job)``
    for each job it trains, calls ``job_done`` with each job's result (in the process that holds the run) and
    ``finish`` with the summary."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self._hooks: dict[str, list[TrackerHook]] = {}

    def hooks(self, job: str, params: Mapping[str, str] | None = None) -> list[Hook]:
        """One hook per tracker for the job with id ``job``, whose sub-run gets ``params``."""
        self._hooks[job] = [TrackerHook(b, job, params or {}) for b in self.backends]
        return list(self._hooks[job])

    def hooks_for(self, job: Any) -> list[Hook]:
        """:meth:`hooks` for a flow's job (:class:`polytask.flows.jobs.Job`), with its :func:`job_params`."""
        return self.hooks(job.id, job_params(job)) if self.backends else []

    def job_done(self, job: str, result: Mapping[str, Any]) -> None:
        """Log what the job's hooks did not here (the test scores; everything when the job trained in another
        process or in an earlier run, or came from the single-task cache), and close the job's sub-run."""
        hooks = self._hooks.pop(job, None)
        for hook in hooks if hooks is not None else [TrackerHook(b, job, {}) for b in self.backends]:
            hook.backend.open_job(job, hook.params)
            hook.send([r for r in result["history"] if r["epoch"] > hook.epoch or r["split"] == "test"])
            hook.backend.end_job(job)

    def finish(self, summary: Mapping[str, Any], summary_path: Path) -> None:
        """Log the run's summary to every tracker and close the run."""
        for b in self.backends:
            b.finish(summary, summary_path)


def refuse_tracking(config: Any, flow: str) -> None:
    """Trackers log ``polytask run`` and ``polytask continual``; another flow given a ``track`` section refuses it
    (a ConfigError naming the key) rather than drop it silently."""
    if config.track.mlflow is not None or config.track.tensorboard is not None:
        raise ConfigError(f"track: {flow} does not log to trackers (polytask run and polytask continual do); remove "
                          "the track section or run the jobs with polytask run")


def open_trackers(config: Any, run_dir: Path, started: str) -> Trackers:
    """The trackers of a run's ``track`` section (:class:`polytask.config.TrackConfig`; none: a ``Trackers``
    that does nothing), each started with the run's config: the run in ``run_dir``, started at ``started`` (a run
    directory emptied and started again is another tracked run), whose resolved config is ``run_dir/config.yaml``.
    Under torchrun only the process that writes the run's files (rank 0) tracks; the other ranks get a ``Trackers``
    that does nothing."""
    track, backends = config.track, []
    if (track.mlflow is None and track.tensorboard is None) or not is_writer():  # torchrun: rank 0 logs
        return Trackers([])
    if track.mlflow is not None:
        mlflow = MLflowBackend(track.mlflow.uri, track.mlflow.experiment, _digest(f"{run_dir.resolve()}@{started}"))
        mlflow.start(run_dir.name, config.model_dump(mode="json"), run_dir / "config.yaml")
        backends.append(mlflow)
    if track.tensorboard is not None:
        tensorboard = TensorBoardBackend(track.tensorboard.dir, run_dir.name)
        tensorboard.start((run_dir / "config.yaml").read_text())
        backends.append(tensorboard)
    return Trackers(backends)


def job_params(job: Any) -> dict[str, str]:
    """A job's (:class:`polytask.flows.jobs.Job`) MLflow params: its id, kind, tasks and its method entry
    flattened (``method.name``, ``method.params.<key>``, ...)."""
    return {"job": job.id, "kind": job.kind, "tasks": ",".join(job.tasks),
            **flatten(job.method.model_dump(mode="json"), "method.")}
