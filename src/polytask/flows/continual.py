"""``polytask continual``: every strategy on a stream, for every seed, with the accuracy matrix and its metrics.

Layout of the run directory::

    config.yaml                    the resolved continual config
    jobs/<strategy>-s<seed>/e<i>/  experience i's job (the engine's checkpoints, at most one a
                                   ``train.checkpoint_interval_s``), then ``done.json`` (its row of the matrix,
                                   steps, wall time and the job's per-epoch history) and, at most one a
                                   ``train.checkpoint_interval_s`` too and always after the last experience,
                                   ``end.safetensors`` (the model and the strategy's state after it)
    summary.json                   ``results``: per strategy label, one entry per seed with its accuracy matrix, the
                                   initial model's accuracies, the metrics, time and the strategy's state size
    report.html                    the matrices as heatmaps, the accuracy of each experience over the stream

Each experience is one job of the engine (``select="last"``: the weights after its last epoch go on to the next
experience), with the strategy riding on it as a hook and a fresh optimiser. A run killed anywhere resumes exactly:
inside an experience from the job's checkpoint (the strategy's state included), else from the last end state
(``resume_point``), the experiences after it trained again, or from the start. An end state is a checkpoint between
experiences, so it follows the checkpoint interval: an experience shorter than it writes none (unless it is the last;
``train.checkpoint_interval_s: 0`` keeps every one), its record landing as it ends (after its end state, if any), and
a kill redoes the experiences since the last end state. End states and records are progress, not results: after an
OS crash (not a kill) an experience whose files had not reached the disk is trained again, to the same bytes, so they
are written with one fsync (the end state's data: whole or absent) instead of four. Every strategy of a seed starts
from the same initial model and sees the same batches.

A strategy's memory is what it keeps beside the model (``state_numel``: buffers, Fisher matrices, old weights, the
entries of every tensor of its checkpointed state) plus what it adds to the model (``added_numel``: prompt pools,
low-rank factors, experts, task statistics), against the architecture's own model (``model_numel``).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import polytask
from polytask.continual.config import ContinualConfig, StrategyConfig, dump_continual_config, load_continual_config
from polytask.continual.strategy import Strategy, build_strategy, union
from polytask.continual.stream import Stream, build_stream
from polytask.engine import checkpoint
from polytask.engine.data import batch_source
from polytask.engine.loop import evaluate, model_on_device, resolve_device, train_job
from polytask.engine.progress import Reporter
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.state import seed_everything
from polytask.engine.step import Method, build_method
from polytask.evaluation.continual import continual_metrics
from polytask.flows.jobs import optimizer_of, scheduler_of
from polytask.flows.runner import open_regime_run, releases_run_locks, versions
from polytask.io import atomic_write_json
from polytask.models import build_model
from polytask.models.mode import evaluating
from polytask.tasks.task import TaskSuite
from polytask.tracking import Trackers, open_trackers

END, DONE = "end.safetensors", "done.json"


def record(d: Path) -> dict[str, Any] | None:
    """Experience folder ``d``'s record (``done.json``: its row of the matrix, steps, wall time, history) when it
    reads; else None (written without fsync: a cut one after an OS crash reads as absent)."""
    try:
        done = json.loads((d / DONE).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def finished(d: Path) -> dict[str, Any] | None:
    """Experience folder ``d``'s record when the experience can be started from: the record reads and its end state
    is there (whole or absent after an OS crash: its data is fsynced, the folder not); else None."""
    done = record(d)
    return done if done is not None and (d / END).is_file() else None


def resume_point(dirs: Sequence[Path]) -> tuple[int, list[dict[str, Any]]]:
    """Where a stream whose experiences live in ``dirs`` resumes: (i, the records of experiences 0..i-1) for the last
    experience i-1 with an end state whose records, and every earlier one's, read (0 and none: from the start).
    Experiences after it train again, to the same bytes (their files, if any, are rewritten)."""
    records: list[dict[str, Any]] = []
    start = 0
    for i, d in enumerate(dirs):
        done = record(d)
        if done is None:
            break
        records.append(done)
        if (d / END).is_file():
            start = i + 1
    return start, records[:start]


def experience_score(model: torch.nn.Module, suite: TaskSuite, batch_size: int) -> float:
    """The experience's test score: the first metric of each of its tasks (accuracy for classification), averaged
    over its tasks."""
    scores = evaluate(model, suite.splits["test"], list(suite.tasks), batch_size)
    return float(sum(next(v for k, v in scores[t.name].items() if k != "loss") for t in suite.tasks)
                 / len(suite.tasks))


def _row(model: torch.nn.Module, stream: Stream, batch_size: int) -> list[float]:
    """The accuracy matrix's row: every experience's test score, the model in eval mode once for all of them."""
    with evaluating(model):
        return [experience_score(model, e.suite, batch_size) for e in stream.experiences]


def run_strategy(config: ContinualConfig, stream: Stream, entry: StrategyConfig, seed: int, job_dir: Path,
                 reporter: Reporter, trackers: Trackers | None = None, every_end: bool = False) -> dict[str, Any]:
    """One strategy on ``stream`` for ``seed``: train every experience in turn (or once on all, for a joint
    strategy), resuming what ``job_dir`` holds; returns its accuracy matrix, initial accuracies, optimiser steps and
    times.
    ``trackers`` log each experience's job (:mod:`polytask.tracking`). ``every_end``: write every experience's end
    state, whatever the checkpoint interval (the schedule search starts runs from them)."""
    trackers = trackers or Trackers([])
    strategy: Strategy = build_strategy(entry.name, entry.params, f"strategies[{entry.label}].params")
    strategy.check(stream, entry.label)
    strategy.seed = seed
    tc, mc = config.train, config.model
    device = resolve_device(tc.device, tc.deterministic)
    seed_everything(seed)
    model = build_model(stream.tasks, stream.input_shape, mc.backbone, mc.backbone_params, mc.architecture,
                        mc.architecture_params, stream.experiences[0].suite.categorical, mc.embedding_dim)
    base_numel = _numel(model.state_dict())
    model = model_on_device(strategy.wrap(model, stream), device)
    initial = _row(model, stream, tc.eval_batch_size)
    steps = range(1) if strategy.joint else range(len(stream.experiences))
    rows: list[list[float]] = []
    seconds, steps_done = 0.0, 0
    optimizer, scheduler = optimizer_of(tc), scheduler_of(tc)  # factories: each experience gets a fresh optimiser
    methods: dict[tuple[str, ...], Method] = {}  # the method built once per set of tasks (its state starts per job)
    dirs = [job_dir / "all"] if strategy.joint else [job_dir / f"e{i}" for i in steps]
    start, records = resume_point(dirs)
    if start:
        saved = checkpoint.load(dirs[start - 1] / END)
        model.load_state_dict(saved["model"])
        strategy.load_state_dict(saved["strategy"])
        rows = [r["accuracy"] for r in records]
        seconds = sum(r["wall_time_s"] for r in records)
        steps_done = sum(r["steps"] for r in records)
    saved_at = time.perf_counter()  # the start (or resumption) counts as the latest end state
    with checkpoint.BackgroundWriter() as writer:
        for i in steps[start:]:
            d = dirs[i]
            strategy.begin(stream, i)
            suite = union(f"{stream.name}/all", [e.suite for e in stream.experiences]) if strategy.joint \
                else strategy.train_suite(stream, i)
            name = f"{entry.label}-s{seed}/{d.name}"
            tracked = trackers.hooks(name, {"job": name, "strategy": entry.name, "seed": str(seed),
                                            "experience": d.name})
            names = tuple(t.name for t in suite.tasks)
            if names not in methods:
                methods[names] = build_method(config.method, names)
            spec = TrainSpec(
                name=name, tasks=suite.tasks, model=model, optimizer=optimizer, scheduler=scheduler,
                method=methods[names],
                data=batch_source(suite.splits, tc.batch_size), epochs=tc.epochs,
                checkpoint=CheckpointPolicy(d, tc.checkpoint_every, tc.checkpoint_interval_s),
                seed=(seed + zlib.crc32(d.name.encode())) % 2**32,
                device=device, hooks=(strategy, *tracked), eval_batch_size=tc.eval_batch_size, precision=tc.precision,
                accumulate=tc.accumulate, select="last", final=False)
            t0 = time.perf_counter()
            result = train_job(spec, reporter, writer)
            trackers.job_done(name, result)
            strategy.end(model, stream, i, device)
            end = every_end or i == steps[-1] or time.perf_counter() - saved_at >= tc.checkpoint_interval_s
            if end:  # written while the row is scored and the next experience trains
                writer.save(d / END, {"model": model.state_dict(), "strategy": strategy.state_dict()}, folder=False)
            row = _row(model, stream, tc.eval_batch_size)
            now = time.perf_counter()
            wall = result["wall_time_s"] + now - t0
            # the record lands after the end state queued before it, while the next experience trains: progress
            # (``resume_point`` resumes after the last end state whose records, and every earlier one's, read; a
            # record without a later end state is trained again, to the same bytes), the results being summary.json,
            # written durably at the end
            done = {"accuracy": row, "steps": result["steps"], "wall_time_s": wall, "history": result["history"]}
            writer.then(lambda path=d / DONE, done=done: atomic_write_json(path, done, durable=False, indent=None))
            if end:
                saved_at = now
            rows.append(row)
            seconds += wall
            steps_done += result["steps"]
            reporter.log(f"[{entry.label} s{seed}] after {d.name}: " + " ".join(f"{v:.3f}" for v in row))
    return {"strategy": entry.name, "label": entry.label, "seed": seed, "joint": strategy.joint,
            "accuracy": rows, "initial": initial, "wall_time_s": seconds, "steps": steps_done,
            "state_numel": _numel(strategy.state_dict()), "model_numel": base_numel,
            "added_numel": _numel(model.state_dict()) - base_numel}


def _numel(tree: Any) -> int:
    """Entries of every tensor in a state tree (a strategy's memory: buffers, Fisher matrices, old weights)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel()
    if isinstance(tree, dict):
        return sum(_numel(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_numel(v) for v in tree)
    return 0


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each result with its metrics; intransigence against the cumulative strategy of the same seed when run."""
    reference = {r["seed"]: [r["accuracy"][k][k] for k in range(len(r["accuracy"]))]
                 for r in results if r["strategy"] == "cumulative"}
    out = []
    for r in results:
        if r["joint"]:
            final = r["accuracy"][-1]
            metrics: dict[str, Any] = {"average_accuracy": sum(final) / len(final), "bwt": None, "fwt": None,
                                       "forgetting": None, "intransigence": None}
        else:
            metrics = continual_metrics(r["accuracy"], r["initial"], reference.get(r["seed"]))
        out.append({**r, "metrics": metrics})
    return out


def _by_label(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["label"], []).append(r)
    return out


def _open(config: ContinualConfig | None, resume: str | Path | None) -> tuple[Path, ContinualConfig]:
    name = f"continual-{config.stream.name}-{time.strftime('%Y%m%d-%H%M%S')}" if config is not None else ""
    return open_regime_run(config, resume, name, load_continual_config, dump_continual_config,
                           "polytask continual needs a config (stream, strategies); see examples/continual.yaml")


@releases_run_locks
def continual(config: ContinualConfig | None, resume: str | Path | None = None, reporter: Reporter | None = None,
              stream: Stream | Callable[[int], Stream] | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) a continual study; returns the run directory and its summary (also in summary.json).

    ``stream``: a prebuilt stream (e.g. :func:`polytask.continual.stream_from_datasets`), or a function of the seed
    that builds one, used instead of ``config.stream`` (which config.yaml still holds; summary.json's ``stream``
    describes the one trained). A resumed run needs the same ``stream`` again."""
    reporter = reporter or Reporter(quiet=True)
    run_dir, config = _open(config, resume)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # config.yaml is written once when the run starts: its time tells this run from one started again in its place
    trackers = open_trackers(config, run_dir, str((run_dir / "config.yaml").stat().st_mtime_ns))
    results, description = [], None
    for seed in config.seeds:
        built = build_stream(config.stream.name, config.stream.params, seed) if stream is None \
            else stream if isinstance(stream, Stream) else stream(seed)
        description = description or built.describe()
        for entry in config.strategies:
            results.append(run_strategy(config, built, entry, seed, run_dir / "jobs" / f"{entry.label}-s{seed}",
                                        reporter, trackers))
    summary = {"kind": "continual", "polytask_version": polytask.__version__, "run_id": run_dir.name,
               "started": started, "versions": versions(), "stream": description,
               "score": "first metric of each experience's tasks (accuracy for classification), averaged",
               "results": _by_label(summarize(results))}
    atomic_write_json(run_dir / "summary.json", summary)
    trackers.finish(summary, run_dir / "summary.json")
    from polytask.report.html import write_report

    write_report([run_dir])
    return run_dir, summary
