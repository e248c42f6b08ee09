"""Using what was trained: a run's job as a model that reads new raw rows and answers in the user's units.

``load(run_dir, job)`` rebuilds the job's network from the run's ``config.yaml`` (``polytask.models.build_model``),
loads its best-validation weights from ``jobs/<job>/best.safetensors`` (safetensors only: nothing is unpickled)
and reads ``preprocessing.json`` (the fitted feature and target standardisation and each classification task's
labels in class-index order, ``TaskSuite.preprocessing``). ``Predictor.predict`` applies that preprocessing to
new rows and returns one column per task: the label of a classification task (and, if asked, its class
probabilities as ``<task>:proba:<label>``), the value of a regression task in the target's original units.
``polytask predict`` is this over files (CSV, TSV or Parquet in and out, written atomically); it checks the run,
the job and the file names before it imports torch, so a typo is answered at once.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polytask.errors import CheckpointError, DataError
from polytask.io import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import Tensor

    from polytask.models import MultiTaskModel
    from polytask.tasks.task import Standardizer, Task

PREPROCESSING = "preprocessing.json"
BEST = "best.safetensors"  # the engine's name for a job's best-validation weights
_WRITABLE = (".csv", ".tsv", ".parquet", ".pq")


@dataclass(frozen=True)
class TrainedJob:
    """A finished job of a run: its id (``stl/<task>``, a method label, ...), kind, tasks and folder."""

    id: str
    kind: str
    tasks: tuple[str, ...]
    dir: Path


def trained_jobs(run_dir: str | os.PathLike[str]) -> dict[str, TrainedJob]:
    """The jobs of ``run_dir`` that finished (``result.json`` and ``best.safetensors`` in their folder), by id."""
    jobs = {}
    for result in sorted(Path(run_dir).glob("jobs/*/result.json")):
        if not (result.parent / BEST).is_file():
            continue
        r = json.loads(result.read_text())
        name = r.get("job", result.parent.name)
        jobs[name] = TrainedJob(name, r.get("kind", ""), tuple(r["tasks"]), result.parent)
    return jobs


def best_joint_job(summary: Mapping[str, Any], jobs: Mapping[str, TrainedJob]) -> str | None:
    """The joint job the summary ranks best (lowest mean rank, then lowest Δm%, then name), or None when the
    summary ranks no trained joint job (an unfinished run, or an advise run whose rows are plans of several
    networks)."""
    ranks = summary.get("mean_rank") or {}
    joint = [name for name, r in (summary.get("results") or {}).items()
             if r.get("kind") == "joint" and name in jobs]
    if not joint:
        return None
    return min(joint, key=lambda n: (ranks.get(n, float("inf")), summary["results"][n].get("delta_m") or 0.0, n))


def _job_list(jobs: Mapping[str, TrainedJob]) -> str:
    return ", ".join(f"{j.id} ({j.kind}: {', '.join(j.tasks)})" for j in jobs.values()) or "none"


def resolve_job(run_dir: str | os.PathLike[str], job: str | None = None) -> TrainedJob:
    """The trained job named ``job`` (its id or its folder under ``jobs/``); None: the best joint job of the
    run's summary. A name that is not a finished job, or no name where the summary ranks no joint job, is an
    error listing the run's finished jobs."""
    run_dir = Path(run_dir)
    jobs = trained_jobs(run_dir)
    if job is None:
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        job = best_joint_job(summary, jobs)
        if job is None:
            raise CheckpointError(f"run {run_dir}: name the job to predict with (--job); {summary_path.name} ranks "
                                  f"no finished joint job; finished jobs: {_job_list(jobs)}")
    by_folder = {j.dir.name: j for j in jobs.values()}
    if job not in jobs and job not in by_folder:
        raise CheckpointError(f"run {run_dir} has no finished job {job!r} (with {BEST}); finished jobs: "
                              f"{_job_list(jobs)}")
    return jobs[job] if job in jobs else by_folder[job]


class Predictor:
    """A trained job with the preprocessing of its run: raw rows in, per-task predictions in the user's units.

    ``model`` is the network (outputs on the training scale: logits, standardised values); ``tasks`` the
    job's tasks with their class labels and target scaling; ``features`` the input columns it reads (None
    when the run's inputs were not table columns: then ``predict`` takes a tensor of raw inputs); ``text`` how a
    ``text`` run tokenizes its text column (``column``, ``tokenizer`` directory, ``max_length``; None otherwise);
    ``categories`` the categories fitted in training of each categorical feature column (column -> sorted
    categories; a value not among them is code 0, unknown).
    """

    def __init__(self, run_dir: Path, job: TrainedJob, model: MultiTaskModel, tasks: list[Task],
                 features: list[str] | None, input_scale: Standardizer | None, targets: list[str],
                 batch_size: int = 1024, text: dict[str, Any] | None = None,
                 categories: dict[str, list[str]] | None = None) -> None:
        self.run_dir, self.job, self.model, self.tasks = run_dir, job, model, tasks
        self.features, self.input_scale, self.targets, self.batch_size = features, input_scale, targets, batch_size
        self.text, self.categories = text, categories

    def __repr__(self) -> str:
        return f"Predictor(run={str(self.run_dir)!r}, job={self.job.id!r}, tasks={[t.name for t in self.tasks]})"

    def inputs(self, data: pd.DataFrame | Tensor | str | os.PathLike[str]) -> Tensor:
        """The model's input tensor for ``data``: a table (a DataFrame, or a CSV/TSV/Parquet file) with exactly
        the run's feature columns, or a tensor of raw inputs (category codes in categorical columns); standardised
        and categorical columns coded as in training. A ``text`` run reads the table's text column only and
        tokenizes it as in training (a tensor is taken as token ids and masks)."""
        import torch

        from polytask.tasks.suites.table import encode_features, read_table

        if isinstance(data, torch.Tensor) and self.text is not None:
            return data
        if isinstance(data, torch.Tensor):
            x = data.double()
            return (x if self.input_scale is None else self.input_scale.encode(x)).float()
        if self.features is None and self.text is None:
            raise DataError(f"run {self.run_dir} was not trained on table columns (its preprocessing.json names "
                            "no features): give predict a tensor of raw inputs")
        if isinstance(data, (str, os.PathLike)):
            path: Path | str = Path(data)
            frame = read_table(Path(data))
        else:
            path, frame = "<DataFrame>", data
        if self.text is not None:
            from polytask.tasks.suites.text import encode_text

            return encode_text(frame, self.text["column"], self.text["tokenizer"], self.text["max_length"], path)
        assert self.features is not None
        return encode_features(frame, self.features, self.input_scale, path, self.targets, self.categories)

    def outputs(self, x: Tensor) -> dict[str, Tensor]:
        """The network's per-task outputs for model inputs ``x`` (already standardised), in batches, on the CPU."""
        import torch

        self.model.eval()
        device = next(self.model.parameters()).device
        names = [t.name for t in self.tasks]
        parts: dict[str, list[Tensor]] = {t.name: [torch.empty(0, t.n_outputs)] for t in self.tasks}
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                for n, o in self.model(x[i:i + self.batch_size].to(device), names).items():
                    parts[n].append(o.float().cpu().reshape(len(o), -1))
        return {n: torch.cat(p) for n, p in parts.items()}

    def predict(self, data: pd.DataFrame | Tensor | str | os.PathLike[str], proba: bool = False) -> pd.DataFrame:
        """Per-task predictions for the rows of ``data`` (see ``inputs``), one row per input row (a DataFrame
        keeps its index): a classification task's label (its class index when the run knew no labels) and,
        with ``proba``, one ``<task>:proba:<label>`` column per class; a regression task's value in the
        target's original units (``<task>:<i>`` per dimension when it has several)."""
        import numpy as np
        import pandas as pd
        import torch

        outs = self.outputs(self.inputs(data))
        columns: dict[str, Any] = {}
        for t in self.tasks:
            out = outs[t.name]
            if t.kind == "classification":
                labels = list(t.classes) or list(range(t.n_outputs))
                columns[t.name] = np.asarray(labels)[out.argmax(-1).numpy()]
                if proba:
                    p = torch.softmax(out.double(), -1).numpy()
                    columns |= {f"{t.name}:proba:{label}": p[:, k] for k, label in enumerate(labels)}
            else:
                values = t.decode(out.double()).numpy()
                if t.n_outputs == 1:
                    columns[t.name] = values[:, 0]
                else:
                    columns |= {f"{t.name}:{i}": values[:, i] for i in range(t.n_outputs)}
        index = data.index if isinstance(data, pd.DataFrame) else None
        return pd.DataFrame(columns, index=index)


def check_run(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` if it holds a run's ``config.yaml`` and ``preprocessing.json``, else a CheckpointError naming it."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    if not (run_dir / PREPROCESSING).is_file():
        raise CheckpointError(f"run {run_dir} has no {PREPROCESSING} (its data never loaded, or polytask was older "
                              "than saved preprocessing): train it again to predict with it")
    return run_dir


def load(run_dir: str | os.PathLike[str], job: str | None = None, device: str | torch.device = "cpu") -> Predictor:
    """The trained ``job`` of ``run_dir`` (None: the best joint job of its summary) as a :class:`Predictor`.

    The network is rebuilt from the run's ``config.yaml`` and ``preprocessing.json`` and given the job's
    best-validation weights (``jobs/<job>/best.safetensors``); every tensor must match, or a CheckpointError
    names the file."""
    import torch
    from safetensors.torch import load_file

    from polytask.config import load_config
    from polytask.methods import load_all
    from polytask.models import build_model
    from polytask.tasks.task import Standardizer, Task, categorical_from_json

    run_dir = check_run(run_dir)
    pre_path = run_dir / PREPROCESSING
    found = resolve_job(run_dir, job)
    config = load_config(run_dir / "config.yaml")
    pre = json.loads(pre_path.read_text())
    saved_tasks = pre["tasks"]
    missing = [n for n in found.tasks if n not in saved_tasks]
    if missing:
        raise CheckpointError(f"{pre_path} describes no task {missing[0]!r} of job {found.id!r}")
    tasks = [Task.from_preprocessing(n, saved_tasks[n]) for n in found.tasks]
    features = pre.get("features")
    shape = pre.get("input_shape") or ([len(features)] if features else None)
    if shape is None:
        raise CheckpointError(f"{pre_path} holds no input_shape (a run from an older polytask): train it again")
    def build() -> torch.nn.Module:
        return build_model(tasks, tuple(shape), config.model.backbone, config.model.backbone_params,
                           config.model.architecture, config.model.architecture_params,
                           categorical_from_json(pre.get("categorical")), config.model.embedding_dim)

    method = next((m for m in config.methods if m.label == found.id), None)
    if method is not None and load_all().get(method.name).extra.get("pareto"):
        from polytask.models.pareto import ParetoEnsemble  # PaMaL: the ensemble, at the simplex centre it reports

        with torch.random.fork_rng(devices=[]):
            model: torch.nn.Module = ParetoEnsemble(build, len(tasks), "same")
    else:
        model = build()
    weights_path = found.dir / BEST
    try:
        weights = load_file(weights_path)
    except Exception as e:
        raise CheckpointError(f"cannot read {weights_path}: {e}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_path} does not fit the model of {run_dir / 'config.yaml'}: {e}") from None
    model.to(device).eval()
    scale = pre.get("input_standardize")
    return Predictor(run_dir, found, model, tasks, features, None if scale is None else Standardizer.from_json(scale),
                     list(saved_tasks), config.train.eval_batch_size, pre.get("text"), pre.get("categories"))


def _kind(path: Path) -> tuple[str, bool]:
    """A table file's type by suffix (``.csv``, ``.tsv``, ``.parquet``, ``.pq``) and whether it is gzipped."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    return Path(name.removesuffix(".gz")).suffix, gz


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if its suffix names a table type polytask writes, else a DataError naming it."""
    path = Path(path)
    kind, gz = _kind(path)
    if kind not in _WRITABLE or (gz and kind not in (".csv", ".tsv")):
        raise DataError(f"output {path}: unknown file type {path.name!r}; use .csv, .tsv (optionally .gz) or "
                        ".parquet")
    return path


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``frame`` (without its index) as CSV, TSV or Parquet by ``path``'s suffix, atomically: a reader sees
    the old file or the whole new one (``polytask.io``)."""
    path = check_output_path(path)
    kind, gz = _kind(path)
    if kind in (".csv", ".tsv"):
        data = frame.to_csv(index=False, sep="\t" if kind == ".tsv" else ",").encode()
        data = gzip.compress(data, mtime=0) if gz else data
    else:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        data = buf.getvalue()
    return atomic_write_bytes(path, data)


def predict_file(run_dir: str | os.PathLike[str], job: str | None, input: str | os.PathLike[str],
                 out: str | os.PathLike[str], proba: bool = False) -> tuple[Path, Predictor, int]:
    """Predict the rows of the table ``input`` with ``job`` of ``run_dir`` and write them to ``out``; returns
    (the written file, the predictor, the number of rows). The run, the job and both file names are checked
    before torch is imported."""
    check_output_path(out)
    if not Path(input).is_file():
        raise DataError(f"table {input} does not exist")
    resolve_job(check_run(run_dir), job)
    predictor = load(run_dir, job)
    frame = predictor.predict(input, proba=proba)
    return write_table(frame, out), predictor, len(frame)
