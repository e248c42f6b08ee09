"""The one training loop of the joint regime, with exact checkpoint/resume.

A job (:class:`~polytask.engine.spec.TrainSpec`) trains one model on a set of tasks with one method. Its full
state (:class:`~polytask.engine.state.LoopState`: model, optimiser, scheduler, method state, RNG states, data
position, best-so-far, history, every hook's state) is checkpointed atomically every epoch and every
``checkpoint.every`` steps; a job killed at any point and resumed ends bit-identical to one that never stopped,
because batch order is a pure function of (seed, epoch, step) and every RNG is restored. A step is one optimiser
step: with ``accumulate`` > 1 it takes that many consecutive batches of the source, and checkpoints fall only
between optimiser steps (a job killed between micro-batches redoes that step). ``precision`` sets the training
forward's autocast (the methods' validation batches too); evaluation runs in full precision.

Under torchrun (``WORLD_SIZE`` > 1) a job trains data-parallel (:mod:`polytask.engine.distributed`): every rank
draws the same global batches, trains on its share of their rows and takes the same step; validation and test are
scored on every rank (the same numbers), and rank 0 alone writes the checkpoints and the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from polytask.engine import checkpoint, distributed, faults
from polytask.engine.data import Batch
from polytask.engine.hooks import Run, StepView, before_update, check_hooks, extra_loss, overriding, train_batch
from polytask.engine.progress import Reporter
from polytask.engine.spec import TrainSpec
from polytask.engine.state import Best, EpochTotals, LoopState, Position, seed_everything
from polytask.engine.step import accumulated_step, autocast, full, step_generator, task_losses
from polytask.errors import CheckpointError, ConfigError, DivergenceError
from polytask.io import atomic_write_bytes, atomic_write_json
from polytask.models import MultiTaskModel
from polytask.models.mode import evaluating, set_training
from polytask.tasks.task import Task, TaskData
from polytask.weighting import StepContext

# ---------------------------------------------------------------- losses and evaluation


@torch.no_grad()
def evaluate(model: MultiTaskModel, sources: Sequence[TaskData], tasks: Sequence[Task],
             batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """Per task, over the labelled rows of the split: the mean loss (on the training scale) and every metric
    (in the original units, ``Task.scores``)."""
    was_training = model.training
    if was_training:  # a model already in eval mode (a caller scoring several splits) is not walked again
        set_training(model, False)
    scores: dict[str, dict[str, float]] = {}
    for src in sources:
        names = [t.name for t in tasks if t.name in src.y]
        if not names:
            continue
        outs: dict[str, list[Tensor]] = {n: [] for n in names}
        for i in range(0, len(src), batch_size):
            for n, o in model(src.x[i:i + batch_size], names).items():
                outs[n].append(o)
        for t in tasks:
            if t.name not in outs:
                continue
            y, parts = src.y[t.name], outs[t.name]
            p = parts[0] if len(parts) == 1 else torch.cat(parts)
            if src.complete(t.name):  # the loss from the labels as the loss takes them (cast once per source)
                loss = t.mean_loss(p, src.labels(t))
            else:  # masks only where labels are missing (remembered per source)
                m = Task.mask(y)
                p, y = p[m], y[m]
                loss = t.mean_loss(p, y)
            scores[t.name] = {"loss": float(loss)} | t.scores(p, y)
    if was_training:
        set_training(model, True)
    return scores


# ---------------------------------------------------------------- setting up


def load_matching(model: torch.nn.Module, path: str) -> list[str]:
    """Load the tensors of a safetensors file whose names and shapes match ``model``; returns their names.

    Raises CheckpointError naming the file if it is unreadable or shares no tensor with the model."""
    try:
        saved = load_file(path)
    except Exception as e:
        raise CheckpointError(f"model.init_from: cannot read {path}: {e}") from None
    own = model.state_dict()
    matched = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise CheckpointError(f"model.init_from: {path} has no tensor matching the model's names and shapes "
                              f"(model has e.g. {next(iter(own))!r}, file has e.g. {next(iter(saved), None)!r})")
    model.load_state_dict(matched, strict=False)
    return sorted(matched)


def resolve_device(name: str, deterministic: bool = True) -> torch.device:
    """``auto`` is cuda when available; asking for cuda without one is an error naming the key. On CUDA,
    ``deterministic`` selects deterministic kernels (cuDNN, cuBLAS workspace), so a resumed run is exact."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but torch sees no CUDA device (use cpu or auto)")
    if name.startswith("cuda") and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device(name)


def model_on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model.to(device)``; on the CPU, ``model`` as it is when every parameter and buffer is already there
    (``Module.to`` walks the tree in Python and resets every tensor's data: 0.1 ms for a small MLP, at every job of
    a continual stream). Elsewhere always ``to``: a module may keep other tensors that its ``_apply`` moves."""
    if device.type == "cpu" and all(t.device.type == "cpu" for t in model.parameters()) and \
            all(t.device.type == "cpu" for t in model.buffers()):
        return model
    return model.to(device)


def selection_score(val: dict[str, dict[str, float]]) -> float:
    """Best-validation criterion: the mean over tasks of the validation loss (lower is better)."""
    losses = [v["loss"] for v in val.values()]
    return float(losses[0]) if len(losses) == 1 else float(np.mean(losses))  # one task: np.mean's value, no call


def check_finite(job: str, tasks: Sequence[Task], losses: Tensor, split: str, epoch: int,
                 where: str = "") -> None:
    """Raise DivergenceError naming the job, the first task whose ``split`` loss is not finite, and the epoch.

    A non-finite loss never recovers (the weights it updates become NaN), and no epoch of it could be the
    best one, so training stops at the first one instead of ending without a best model."""
    finite = torch.isfinite(losses)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    if bad:
        k = bad[0]
        others = f" (and {len(bad) - 1} other task(s))" if len(bad) > 1 else ""
        raise DivergenceError(
            f"job {job!r} diverged: task {tasks[k].name!r}{others} has {split} loss {float(losses[k])} at "
            f"epoch {epoch}{where}; lower train.optimizer.lr or check the scale of the task's targets")


def _records(job: str, epoch: int, step: int, split: str, scores: dict[str, dict[str, float]],
             extra: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    return [
        {"job": job, "epoch": epoch, "step": step, "split": split, "task": t} | s | (extra or {}).get(t, {})
        for t, s in scores.items()
    ]


# ---------------------------------------------------------------- the loop


def merge_batches(micro: Sequence[Batch]) -> Batch:
    """The effective batch of an optimiser step's micro-batches, as hooks see it: one batch when there is one,
    else the rows of each source concatenated (micro-batches over the same sources, as the in-memory source
    gives); micro-batches over different source objects are shown as the first one."""
    if len(micro) == 1:
        return micro[0]
    first = micro[0]
    if all(len(b.sources) == len(first.sources) and all(a is c for a, c in zip(b.sources, first.sources, strict=True))
           for b in micro):
        return Batch(first.sources, [torch.cat(col) for col in zip(*(b.rows for b in micro), strict=True)])
    return first


def _timing(path: Path) -> dict[str, Any]:
    """The wall-clock times saved beside a checkpoint (written without fsync: after an OS crash the file may be
    missing or cut, and the job then counts its time from the resumption only)."""
    try:
        timing = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return timing if isinstance(timing, dict) else {}


def train_job(spec: TrainSpec, reporter: Reporter | None = None,
              writer: checkpoint.BackgroundWriter | None = None) -> dict[str, Any]:
    """Train ``spec`` (resuming from its checkpoint directory if that holds a checkpoint); returns its result:
    the best-validation epoch, its validation and test scores, steps, wall time and the per-epoch history.

    ``writer``: the caller's checkpoint writer, for a caller that writes more after the job (a continual stream's
    next experience): the job's last checkpoint is then still landing when it returns, and files the caller saves
    later land after it. None: the job's own writer, and every checkpoint has landed when it returns."""
    comm = distributed.init_from_env()
    writes = distributed.is_writer(comm)
    reporter = reporter if reporter is not None and writes else Reporter(quiet=True)
    check_hooks(spec.hooks)
    tasks = list(spec.tasks)
    device = torch.device(spec.device)
    data = spec.data.to(device)
    seed, method, hooks, policy = spec.seed, spec.method, list(spec.hooks), spec.checkpoint
    loss_fn = spec.losses or task_losses

    seed_everything(seed)
    model = model_on_device(spec.model if isinstance(spec.model, torch.nn.Module) else spec.model(), device)
    opt = spec.optimizer(model.parameters())
    sched = spec.scheduler(opt, spec.epochs) if spec.scheduler is not None else None
    state = LoopState(model, opt, sched, method.init(), Position(), EpochTotals.zeros(len(tasks)), hooks=hooks)
    run = Run(spec.name, model, opt, tasks, data, seed, device, state)
    for h in hooks:
        h.init(run)
    timing: dict[str, Any] = {}
    if policy.last.exists():
        state.restore(checkpoint.load(policy.last), str(policy.last))
        timing = _timing(policy.timing)
    elapsed = timing.get("elapsed", 0.0)
    clocks = timing.get("hooks", {})
    for h in hooks:
        if h.name in clocks:
            h.load_timing(clocks[h.name])

    own = writer is None
    writer = checkpoint.BackgroundWriter() if writer is None else writer

    def save_checkpoint(last: bool = False) -> None:
        """Queue a checkpoint, unless the previous one (or the job's start) is younger than ``policy.interval``
        (``last``: always)."""
        nonlocal saved_at
        now = time.perf_counter()
        if not writes or (not last and now - saved_at < policy.interval):
            return
        saved_at = now
        measured = {h.name: t for h in hooks if (t := h.timing()) is not None}
        timing = {"elapsed": elapsed + now - t0, **({"hooks": measured} if measured else {})}
        writer.save(policy.last, state.tree(), lambda: atomic_write_json(policy.timing, timing, durable=False))

    @torch.no_grad()
    def val_losses() -> Tensor:
        """Task losses on a validation batch drawn from (seed, step), for methods that watch validation."""
        batch = data.val_batch(seed, pos.global_step)
        with evaluating(model), cast():
            return full(loss_fn(model, batch.sources, batch.rows, tasks))

    cast = autocast(spec.precision, device)
    # the hooks that do something at each point of a step (the others are not called), and the step's generator
    stepping, replacing, adding, updating = (overriding(hooks, m) for m in
                                             ("on_step", "train_batch", "extra_loss", "before_update"))
    watched = bool(stepping or replacing or adding or updating)
    ending = overriding(hooks, "on_epoch")
    # fixed weights (a weighting that reads nothing): no context nor generator for its steps, the weights read once
    fixed = method.impl.fixed if method.kind == "weighting" else None
    fixed_values = None if fixed is None else fixed.tolist()
    generator = None if fixed is not None else torch.Generator()
    count_steps = faults.armed("step")
    n_micro = spec.accumulate
    n_batches = data.steps_per_epoch()
    steps = math.ceil(n_batches / n_micro)
    pos = state.position
    reporter.start(spec.name, spec.epochs * steps, pos.epoch * steps + pos.step)
    t0 = saved_at = time.perf_counter()  # the job's start (or resumption) counts as its latest checkpoint
    with writer if own else contextlib.nullcontext():
        set_training(model, True)
        while pos.epoch < spec.epochs:
            epoch = pos.epoch
            batches = data.epoch(seed, epoch)
            acc = state.totals
            while pos.step < steps:
                micro = [batches[pos.step]] if n_micro == 1 else \
                    [batches[i] for i in range(pos.step * n_micro, min((pos.step + 1) * n_micro, n_batches))]
                ctx = None if generator is None else StepContext(  # fixed weights read no context
                    pos.global_step, epoch, None, val_losses if method.needs_val else None, steps,
                    step_generator(seed, pos.global_step, generator))
                joined = view = None
                if watched:
                    view = StepView(epoch, pos.step, pos.global_step, merge_batches(micro))
                    for h in stepping:
                        h.on_step(run, view)
                    joined = train_batch(replacing, run, view) if replacing else None
                pairs = [(joined.sources, joined.rows)] if joined is not None else \
                    [(micro[0].sources, micro[0].rows)] if n_micro == 1 else [(b.sources, b.rows) for b in micro]
                losses, weights, state.method = accumulated_step(
                    model, method, state.method, pairs, tasks, opt, ctx, loss_fn,
                    extra=(lambda view=view: extra_loss(adding, run, view)) if adding else None,
                    precision=spec.precision,
                    before_update=(lambda view=view: before_update(updating, run, view)) if updating else None,
                    comm=comm)
                values = losses.tolist()  # one read a step
                if not all(map(math.isfinite, values)):  # the check names the task
                    check_finite(spec.name, tasks, losses.detach().cpu(), "training", epoch + 1,
                                 f", step {pos.step + 1} of {steps} (global step {pos.global_step + 1})")
                acc.add(values, None if weights is None else fixed_values if weights is fixed else weights.tolist())
                pos.step += 1
                pos.global_step += 1
                reporter.advance()
                if count_steps:
                    faults.hit("step")
                if policy.every and pos.global_step % policy.every == 0 and pos.step < steps:
                    save_checkpoint()
            if sched is not None:
                sched.step()
            val_scores = evaluate(model, data.split("val"), tasks, spec.eval_batch_size)
            val_losses_now = [val_scores[t.name]["loss"] for t in tasks if t.name in val_scores]
            if not all(map(math.isfinite, val_losses_now)):  # the check (a tensor) only when one is not finite
                check_finite(spec.name, [t for t in tasks if t.name in val_scores],
                             torch.tensor(val_losses_now, dtype=torch.float64), "validation", epoch + 1)
            train_scores = {t.name: {"loss": acc.loss[k] / acc.n} for k, t in enumerate(tasks)}
            weights_now = {t.name: {"weight": acc.weight[k] / acc.nw} for k, t in enumerate(tasks) if acc.nw}
            state.history += _records(spec.name, epoch + 1, pos.global_step, "train", train_scores, weights_now)
            state.history += _records(spec.name, epoch + 1, pos.global_step, "val", val_scores)
            score = selection_score(val_scores)
            if spec.select == "last":
                state.best = Best(score, epoch + 1, val_scores)  # "best" is the last epoch; no weights copied
            elif score < state.best.score:
                state.best = Best(score, epoch + 1, val_scores, {k: v.clone() for k, v in model.state_dict().items()})
            if not reporter.quiet:
                reporter.log(f"[{spec.name}] epoch {epoch + 1}/{spec.epochs} " + " ".join(
                    f"{t}.{m}={v:.4f}" for t, s in val_scores.items() for m, v in s.items() if m != "loss"))
            for h in ending:
                h.on_epoch(run, epoch + 1)
            pos.epoch += 1
            pos.step = 0
            state.totals = EpochTotals.zeros(len(tasks))
            save_checkpoint(last=pos.epoch == spec.epochs and spec.final)
    reporter.finish()

    if spec.select == "best":
        model.load_state_dict(state.best.model)
    test_scores: dict[str, dict[str, float]] = {}
    if spec.final and writes:
        atomic_write_bytes(policy.best, checkpoint.tensors_to_bytes(
            model.state_dict(), {"job": spec.name, "epoch": str(state.best.epoch)}))
    if spec.final:
        test_scores = evaluate(model, data.split("test"), tasks, spec.eval_batch_size)
    return {
        "job": spec.name, "method": method.name, "tasks": [t.name for t in tasks],
        "best_epoch": state.best.epoch, "val": state.best.val, "test": test_scores,
        "steps": pos.global_step, "wall_time_s": elapsed + time.perf_counter() - t0,
        **({"world_size": comm.world} if comm is not None else {}),
        "history": state.history + _records(spec.name, state.best.epoch, pos.global_step, "test", test_scores),
    }
