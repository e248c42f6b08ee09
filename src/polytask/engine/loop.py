"""The one training loop of the joint regime, with exact checkpoint/resume.

A job trains one model on a set of tasks with one method. Its full state (model, optimiser, scheduler,
method state, RNG states, data position, best-so-far, history) is checkpointed atomically every epoch
and every ``checkpoint_every`` steps; a job killed at any point and resumed ends bit-identical to one that
never stopped, because batch order is a pure function of (seed, epoch, step) and every RNG is restored.
"""

from __future__ import annotations

import json
import os
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from polytask.config import Config, MethodConfig
from polytask.engine import checkpoint, faults
from polytask.engine.data import epoch_batches, permutation, steps_per_epoch
from polytask.engine.progress import Reporter
from polytask.engine.step import build_method, masked_loss, train_step
from polytask.errors import CheckpointError, ConfigError, DivergenceError
from polytask.io import atomic_write_bytes, atomic_write_json
from polytask.models import MultiTaskModel, build_model
from polytask.relations.probes import ProbeSet
from polytask.tasks.task import Task, TaskData, TaskSuite
from polytask.weighting import StepContext

CHECKPOINT = "last.safetensors"
BEST = "best.safetensors"
TIMING = "timing.json"  # wall time so far; kept out of the checkpoint so that identical runs write identical bytes


@dataclass(frozen=True)
class Job:
    """One model to train: an id (``stl/<task>`` or a method label), its tasks and its method."""

    id: str
    tasks: tuple[str, ...]
    method: MethodConfig
    kind: str  # "single_task" or "joint"

    @property
    def seed_offset(self) -> int:
        return zlib.crc32(self.id.encode())


# ---------------------------------------------------------------- losses and evaluation


def task_losses(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                tasks: Sequence[Task]) -> Tensor:
    """The K per-task mean losses of one step, each over the rows labelled for that task."""
    out: dict[str, Tensor] = {}
    for src, r in zip(sources, rows, strict=True):
        names = [t.name for t in tasks if t.name in src.y]
        preds = model(src.x[r], names)
        for t in tasks:
            if t.name in src.y:
                out[t.name] = masked_loss(t, preds[t.name], src.y[t.name][r])
    return torch.stack([out[t.name] for t in tasks])


@torch.no_grad()
def evaluate(model: MultiTaskModel, sources: Sequence[TaskData], tasks: Sequence[Task],
             batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """Per task, over the labelled rows of the split: the mean loss (on the training scale) and every metric
    (in the original units, ``Task.scores``)."""
    was_training = model.training
    model.eval()
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
            y = src.y[t.name]
            m = Task.mask(y)
            p = torch.cat(outs[t.name])[m]
            scores[t.name] = {"loss": float(t.loss(p, y[m]).mean())} | t.scores(p, y[m])
    model.train(was_training)
    return scores


# ---------------------------------------------------------------- optimisation pieces


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    o = config.train.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LRScheduler | None:
    s = config.train.scheduler
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.train.epochs)
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    return None


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


def selection_score(val: dict[str, dict[str, float]]) -> float:
    """Best-validation criterion: the mean over tasks of the validation loss (lower is better)."""
    return float(np.mean([v["loss"] for v in val.values()]))


def check_finite(job: Job, tasks: Sequence[Task], losses: Tensor, split: str, epoch: int,
                 where: str = "") -> None:
    """Raise DivergenceError naming the job, the first task whose ``split`` loss is not finite, and the epoch.

    A non-finite loss never recovers (the weights it updates become NaN), and no epoch of it could be the
    best one, so training stops at the first one instead of ending without a best model."""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        k = bad[0]
        others = f" (and {len(bad) - 1} other task(s))" if len(bad) > 1 else ""
        raise DivergenceError(
            f"job {job.id!r} diverged: task {tasks[k].name!r}{others} has {split} loss {float(losses[k])} at "
            f"epoch {epoch}{where}; lower train.optimizer.lr or check the scale of the task's targets")


def _records(job: Job, epoch: int, step: int, split: str, scores: dict[str, dict[str, float]],
             extra: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    return [
        {"job": job.id, "epoch": epoch, "step": step, "split": split, "task": t} | s | (extra or {}).get(t, {})
        for t, s in scores.items()
    ]


# ---------------------------------------------------------------- the loop


def train_job(
    job: Job,
    suite: TaskSuite,
    config: Config,
    job_dir: Path,
    reporter: Reporter | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    probes: ProbeSet | None = None,
) -> dict[str, Any]:
    """Train ``job`` (resuming from ``job_dir`` if it holds a checkpoint); returns its result dict.

    ``on_epoch(history)`` is called after every epoch with the job's records so far. ``probes`` (affinity
    estimators) look at the run without changing it; their state is checkpointed with the job.
    """
    reporter = reporter or Reporter(quiet=True)
    tasks = [suite.task(n) for n in job.tasks]
    cfg = config.train
    device = resolve_device(cfg.device, cfg.deterministic)
    splits = {s: [d.to(device) for d in srcs] for s, srcs in suite.subset(job.tasks).splits.items()}
    train, val = splits["train"], splits["val"]
    seed = config.seed + job.seed_offset

    seed_everything(seed)
    model = build_model(tasks, suite.input_shape, config.model.backbone, config.model.backbone_params,
                        config.model.architecture, config.model.architecture_params).to(device)
    if config.model.init_from:
        load_matching(model, config.model.init_from)
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config)
    method = build_method(job.method, job.tasks)
    state: dict[str, Any] = {
        "position": {"epoch": 0, "step": 0, "global_step": 0},
        "method": method.init(),
        "epoch_acc": {"loss": torch.zeros(len(tasks), dtype=torch.float64),
                      "weight": torch.zeros(len(tasks), dtype=torch.float64), "n": 0, "nw": 0},
        "best": {"score": float("inf"), "epoch": -1, "val": {}, "model": None},
        "history": [],
        "elapsed": 0.0,
        "probes": None,
    }
    ckpt_path = job_dir / CHECKPOINT
    if ckpt_path.exists():
        saved = checkpoint.load(ckpt_path)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None:
            sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state = {k: saved[k] for k in state if k != "elapsed"}
    timing = json.loads((job_dir / TIMING).read_text()) if ckpt_path.exists() and (job_dir / TIMING).exists() else {}
    state["elapsed"] = timing.get("elapsed", 0.0)
    if probes is not None:
        probes.start(len(tasks))
        if state["probes"] is not None:
            probes.load(state["probes"])
            probes.load_clock(timing.get("probes", {}))

    def save_checkpoint() -> None:
        if probes is not None:
            state["probes"] = probes.tree()
        checkpoint.save(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rng_state(), **{k: v for k, v in state.items() if k != "elapsed"},
        })
        atomic_write_json(job_dir / TIMING, {"elapsed": state["elapsed"] + time.perf_counter() - t0,
                                             **({"probes": probes.clock_tree()} if probes is not None else {})})

    sizes = [len(s) for s in train]

    @torch.no_grad()
    def val_losses() -> Tensor:
        """Task losses on a validation batch drawn from (seed, step), for methods that watch validation."""
        rows = [permutation(len(s), seed, 7919, pos["global_step"])[:cfg.batch_size] for s in val]
        model.eval()
        try:
            return task_losses(model, val, rows, tasks)
        finally:
            model.train()
    steps = steps_per_epoch(sizes, cfg.batch_size)
    pos = state["position"]
    reporter.start(job.id, cfg.epochs * steps, pos["epoch"] * steps + pos["step"])
    t0 = time.perf_counter()
    model.train()
    while pos["epoch"] < cfg.epochs:
        epoch = pos["epoch"]
        batches = epoch_batches(sizes, cfg.batch_size, seed, epoch)
        acc = state["epoch_acc"]
        while pos["step"] < steps:
            ctx = StepContext(pos["global_step"], epoch, None, val_losses if method.needs_val else None, steps,
                              torch.Generator().manual_seed(seed * 1_000_003 + pos["global_step"]))
            if probes is not None:
                probes.on_step(pos["global_step"], model, opt, train, batches[pos["step"]], tasks)
            losses, weights, state["method"] = train_step(
                model, method, state["method"], train, batches[pos["step"]], tasks, opt, ctx, task_losses)
            losses = losses.detach().double().cpu()
            check_finite(job, tasks, losses, "training", epoch + 1,
                         f", step {pos['step'] + 1} of {steps} (global step {pos['global_step'] + 1})")
            acc["loss"] += losses
            if weights is not None:
                acc["weight"] += weights.double().cpu()
                acc["nw"] += 1
            acc["n"] += 1
            pos["step"] += 1
            pos["global_step"] += 1
            reporter.advance()
            faults.hit("step")
            if cfg.checkpoint_every and pos["global_step"] % cfg.checkpoint_every == 0 and pos["step"] < steps:
                save_checkpoint()
        if sched is not None:
            sched.step()
        if probes is not None:
            probes.on_epoch(model, train, tasks)
        val_scores = evaluate(model, val, tasks, cfg.eval_batch_size)
        check_finite(job, [t for t in tasks if t.name in val_scores],
                     torch.tensor([val_scores[t.name]["loss"] for t in tasks if t.name in val_scores]),
                     "validation", epoch + 1)
        train_scores = {t.name: {"loss": float(acc["loss"][k] / acc["n"])} for k, t in enumerate(tasks)}
        weights_now = {t.name: {"weight": float(acc["weight"][k] / acc["nw"])} for k, t in enumerate(tasks)
                       if acc["nw"]}
        state["history"] += _records(job, epoch + 1, pos["global_step"], "train", train_scores, weights_now)
        state["history"] += _records(job, epoch + 1, pos["global_step"], "val", val_scores)
        score = selection_score(val_scores)
        if score < state["best"]["score"]:
            state["best"] = {"score": score, "epoch": epoch + 1, "val": val_scores,
                             "model": {k: v.clone() for k, v in model.state_dict().items()}}
        reporter.log(f"[{job.id}] epoch {epoch + 1}/{cfg.epochs} " + " ".join(
            f"{t}.{m}={v:.4f}" for t, s in val_scores.items() for m, v in s.items() if m != "loss"))
        pos["epoch"] += 1
        pos["step"] = 0
        state["epoch_acc"] = {"loss": torch.zeros_like(acc["loss"]), "weight": torch.zeros_like(acc["weight"]),
                              "n": 0, "nw": 0}
        save_checkpoint()
        if on_epoch is not None:
            on_epoch(state["history"])
    reporter.finish()

    model.load_state_dict(state["best"]["model"])
    weights_cpu = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(job_dir / BEST, checkpoint.tensors_to_bytes(
        weights_cpu, {"job": job.id, "epoch": str(state["best"]["epoch"])}))
    test_scores = evaluate(model, splits["test"], tasks, cfg.eval_batch_size)
    return {
        "job": job.id, "kind": job.kind, "method": job.method.name, "tasks": list(job.tasks),
        "best_epoch": state["best"]["epoch"], "val": state["best"]["val"], "test": test_scores,
        "steps": pos["global_step"], "wall_time_s": state["elapsed"] + time.perf_counter() - t0,
        "probe_time_s": probes.seconds if probes is not None else 0.0,
        "history": state["history"] + _records(job, state["best"]["epoch"], pos["global_step"], "test", test_scores),
    }
