"""Overhead of ``polytask continual`` (issue 10) over a hand-written PyTorch loop doing the same work.

The problem: split-digits class-incremental (5 experiences of 2 classes, one head over the 10 classes), an MLP
64-256-256-10, batch 32, SGD lr 0.01 momentum 0.9, ``--epochs`` epochs per experience (a fresh optimiser each),
one thread. Two sides, on the same rows (taken from polytask's stream):

- ``polytask``: :func:`polytask.flows.continual.run_strategy` in a temporary directory, the checkpoint policy as
  default (a resumable checkpoint with the strategy's state after an epoch, but at most one a second from the job's
  start (``train.checkpoint_interval_s``): none in an experience this short; an experience's end state (model and
  strategy state, ``end.safetensors``) follows the same interval, from the previous end state: in a stream this short
  only the last experience writes one, with every experience's ``done.json``; a kill redoes the stream from the last
  end state, or its start). ``polytask-every-epoch`` sets the interval to 0: a checkpoint after every epoch and an
  end state after every experience.
- ``plain``: the loop a user would write: for each experience, a fresh optimiser, ``epochs`` passes over its
  training rows in a random order (zero_grad, forward, cross-entropy, backward, step, the loss summed for the
  epoch's mean), after each epoch a validation pass (loss and accuracy on the experience's validation rows, as the
  engine's per-epoch validation); before training and after each experience the accuracy on every experience's
  test rows (the accuracy matrix's row), and no checkpoint: the headline (issue 10's target) compares polytask, as
  configured by default, with it. ``plain+save`` also writes ``torch.save({model, optimizer})`` after every epoch:
  ``polytask-every-epoch`` is compared with it (the same number of checkpoints). ``plain-model`` is the loop
  without checkpoints training polytask's own model (hard sharing: the encoder and a head in a ``ModuleDict``,
  outputs in a dict) instead of an ``nn.Sequential``: polytask / plain-model is the engine's overhead without the
  model's structure.

For ``replay`` (polytask's ``replay`` with ``size: 200, batch_size: 32`` and its default ``update: experience``,
the protocol of Avalanche's ReplayPlugin) the plain loop keeps a reservoir buffer of 200 rows (Vitter's algorithm R,
the experience's training rows offered in a random order once it is trained) and trains each step on the current
batch concatenated with 32 rows drawn from the buffer without replacement (one forward, the mean cross-entropy of
the 64 rows: polytask's replay joins its buffered rows to the batch in the same way, see its docstring).

What the sides do not share: polytask's per-epoch checkpoint also holds the RNG states, the data position, the
history and the strategy's state, and is written atomically (temporary file, rename) and durably (fsync) off the
training thread, so a SIGKILL or an OS crash at any point resumes exactly; ``plain+save``'s ``torch.save`` writes in
place (a kill during the write leaves a cut file) and holds no RNG state. polytask also writes the model and
strategy state after an experience (``end.safetensors``, atomically, its data fsynced; at most one per interval, the
last experience's always) and every experience's ``done.json`` after it (progress: an OS crash may lose them, and
the experiences after the last end state that landed train again, exactly). ``--durable-variant`` adds
``plain+durable``: the plain loop writing what an exact resume needs (model, optimiser, RNG states, position, the
replay buffer) per epoch, atomically and durably, on its training thread, as a user would. The batches are the
same size and number on both sides, in different random orders (polytask's order is a pure function of (seed,
epoch)).

Every round times each variant once, back to back, in an order rotated from round to round, on two clocks: wall
time and this process's CPU time (which ignores waits on the disk and other processes on a shared machine; it counts
polytask's checkpoint-writer thread). Each run gets a fresh temporary directory, made and removed outside the timed
region (deleting a finished run's files is not training). The
ratios polytask / plain are paired within each round; the JSON gives medians and spread (quartiles, min, max), and
for the ratios a 95% bootstrap interval of the median (``median_ci95``). The target (issue 10): median ratio to
``plain`` <= 1.1. Run it on a quiet machine (the JSON records the load average before and after, the benchmark itself
counting about 1): a neighbour's load slows polytask's Python more than the plain loop's (naive, 320 pairs in 16
alternating processes on the 2-core VM: median ratio 1.089 while the plain loop ran 187 ms, 1.120 while a neighbour
slowed it to 225 ms). ``--processes N`` measures the headline ratio again in N fresh processes of
``--process-rounds`` pairs (polytask by default, the plain loop; the order alternating), pooled with its interval
(``alternating_processes``): fewer variants share a process, so its spread is smaller than the rounds'.
``memory`` gives every registered strategy's memory (``state_numel``, the entries of the tensors it checkpoints, and
``added_numel``, what it adds to the model) beside the model's parameter count.

Prints one JSON object (with the load average before and after) and writes it to ``--out``. Usage: python
benchmarks/continual_overhead.py [--epochs 10] [--rounds 7] [--seed 0] [--strategies naive replay] [--tmp DIR]
[--out benchmarks/results/continual_overhead.json]
[--processes 16 --process-rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from step_time import summary
from torch import nn

from polytask.continual import STRATEGIES
from polytask.continual.config import ContinualConfig, StrategyConfig
from polytask.continual.stream import Stream, build_stream
from polytask.engine.progress import Reporter
from polytask.flows.continual import run_strategy
from polytask.models import build_model

TARGET = 1.1
HIDDEN = [256, 256]
BATCH, LR, MOMENTUM = 32, 0.01, 0.9
BUFFER, REPLAY_BATCH = 200, 32
# parameters of the registered strategies for the memory table (those without defaults) and the benchmark
PARAMS: dict[str, dict[str, Any]] = {"compose": {"strategies": ["naive", "cumulative"]}}
NEEDS_ENCODER = {"l2p": "needs a pretrained hf encoder: see benchmarks/l2p_text.py (its pool is M L_p D + M D numbers)"}

Variant = Callable[[Path], dict[str, Any]]  # called with a fresh, empty directory


def config(epochs: int, interval: float | None = None) -> ContinualConfig:
    """The benchmark's configuration; ``interval``: ``train.checkpoint_interval_s`` (None: the default)."""
    return ContinualConfig.model_validate({
        "model": {"backbone": "mlp", "backbone_params": {"hidden": HIDDEN}},
        "train": {"epochs": epochs, "batch_size": BATCH, "threads": 1,
                  "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM},
                  **({} if interval is None else {"checkpoint_interval_s": interval})}})


def replay_params() -> dict[str, Any] | None:
    """The registered replay strategy's parameters for a buffer of 200 and 32 replayed rows a step, or None when no
    strategy named ``replay`` is registered (yet)."""
    if "replay" not in STRATEGIES.names():
        return None
    fields = set(getattr(STRATEGIES.get("replay").params, "model_fields", {}))
    size = next((f for f in ("size", "buffer_size", "mem_size", "capacity") if f in fields), None)
    batch = next((f for f in ("batch_size", "replay_batch", "mem_batch", "batch") if f in fields), None)
    return {**({size: BUFFER} if size else {}), **({batch: REPLAY_BATCH} if batch else {})}


@contextmanager
def no_fsync() -> Iterator[None]:
    """``os.fsync`` a no-op (diagnostic only: what the durable writes of polytask's checkpoints cost)."""
    fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = fsync


def polytask_variant(stream: Stream, strategy: str, params: dict[str, Any], epochs: int, seed: int,
                     tmp: str | None, durable: bool = True, interval: float | None = None) -> Variant:
    cfg = config(epochs, interval)

    def fn(d: Path) -> dict[str, Any]:
        with nullcontext() if durable else no_fsync():
            job = d / "job"
            r = run_strategy(cfg, stream, StrategyConfig(name=strategy, params=params), seed, job,
                             Reporter(quiet=True))
        return {"final": r["accuracy"][-1], "steps": r["steps"], "state_numel": r["state_numel"],
                "added_numel": r["added_numel"]}
    return fn


def tensors(stream: Stream) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per experience, per split: (inputs, integer labels) of polytask's stream (one task, one source each)."""
    (task,) = stream.tasks
    out = []
    for e in stream.experiences:
        splits = {}
        for split, sources in e.suite.splits.items():
            (src,) = sources
            splits[split] = (src.x, src.y[task.name].long())
        out.append(splits)
    return out


def plain_model(n_in: int, n_out: int) -> nn.Module:
    layers: list[nn.Module] = []
    for w in HIDDEN:
        layers += [nn.Linear(n_in, w), nn.ReLU()]
        n_in = w
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def durable_save(tree: dict[str, Any], path: Path) -> None:
    """``torch.save`` as a resumable checkpoint must be written: to a temporary file, fsync, rename over ``path``,
    fsync the folder (a kill or an OS crash leaves the old file or the new one, whole), on the training thread."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(tree, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PolytaskModel(nn.Module):
    """polytask's model of the benchmark (hard sharing: the MLP encoder, one head), giving the task's logits: the
    plain loop on it (``plain-model``) separates the cost of the multi-task model's structure from the engine's."""

    def __init__(self, stream: Stream) -> None:
        super().__init__()
        mc = config(1).model
        self.model = build_model(stream.tasks, stream.input_shape, mc.backbone, mc.backbone_params, mc.architecture,
                                 mc.architecture_params, stream.experiences[0].suite.categorical, mc.embedding_dim)
        self.task = stream.tasks[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.task]


def plain_variant(stream: Stream, epochs: int, seed: int, save: bool | str, replay: bool,
                  polytask_model: bool = False) -> Variant:
    """The hand-written loop (module docstring); ``save``: False, True (``torch.save`` in place per epoch) or
    ``"durable"`` (:func:`durable_save` of model, optimiser, the RNG states and the position per epoch: the
    guarantees of polytask's checkpoint, written the way a user would, on the training thread).
    ``polytask_model``: the loop trains polytask's model (:class:`PolytaskModel`) instead of an ``nn.Sequential``."""
    data = tensors(stream)
    n_in, n_out = stream.input_shape[0], stream.tasks[0].n_outputs

    def fn(folder: Path) -> dict[str, Any]:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        pick = random.Random(seed)
        model = PolytaskModel(stream) if polytask_model else plain_model(n_in, n_out)
        rows = [accuracy(model, *d["test"])[1] for d in data]  # the initial row of the matrix
        steps, history = 0, []
        buf_x, buf_y = torch.empty(BUFFER, n_in), torch.empty(BUFFER, dtype=torch.long)
        filled = seen = 0
        for e in data:
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            x, y = e["train"]
            for _ in range(epochs):
                total, n = 0.0, 0
                for idx in torch.randperm(len(x), generator=g).split(BATCH):
                    xb, yb = x[idx], y[idx]
                    if replay and filled:  # one batch: the current rows and REPLAY_BATCH buffered ones
                        m = torch.randperm(filled, generator=g)[:REPLAY_BATCH]
                        xb, yb = torch.cat([xb, buf_x[m]]), torch.cat([yb, buf_y[m]])
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    n += 1
                    steps += 1
                history.append({"train": total / n, "val": accuracy(model, *e["val"])})
                if save == "durable":
                    durable_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "rng": {"torch": torch.get_rng_state(), "generator": g.get_state(),
                                          "python": pick.getstate()},
                                  "position": {"experience": len(history) // epochs, "epoch": len(history)},
                                  "buffer": (buf_x[:filled], buf_y[:filled], seen) if replay else None},
                                 folder / "last.pt")
                elif save:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                               folder / "last.pt")
            if replay:  # reservoir sampling (Vitter's algorithm R) of the experience's rows, in a random order
                for i in torch.randperm(len(x), generator=g).tolist():
                    j = seen if seen < BUFFER else pick.randrange(seen + 1)
                    seen += 1
                    if j < BUFFER:
                        buf_x[j], buf_y[j] = x[i], y[i]
                        filled = min(seen, BUFFER)
            rows = [accuracy(model, *d_["test"])[1] for d_ in data]
        return {"final": rows, "steps": steps}
    return fn


@contextmanager
def clocked(targets: dict[str, tuple[Any, str]], into: dict[str, float]) -> Iterator[None]:
    """Wrap each ``(owner, attribute)`` so the training thread's CPU seconds in its calls add up under its label
    (diagnostic for ``--breakdown``; nested wrapped calls are counted in each)."""
    saved = []
    for label, (owner, attr) in targets.items():
        original = getattr(owner, attr)

        def wrapper(*a: Any, _f: Any = original, _label: str = label, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return _f(*a, **k)
            finally:
                into[_label] = into.get(_label, 0.0) + time.thread_time() - t
        saved.append((owner, attr, original))
        setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def breakdown(polytask_fn: Variant, plain_fn: Variant, runs: int, tmp: str | None) -> dict[str, Any]:
    """Where each side's CPU time goes (medians over ``runs`` instrumented runs, milliseconds): the training
    thread's time in the engine's step, evaluation, checkpoint serialisation and the data order, the other threads'
    time (polytask's checkpoint writer: writes, fsyncs), and the rest (loop bookkeeping, setup, strategy hooks)."""
    import polytask.engine.checkpoint as checkpoint_module
    import polytask.engine.data as data_module
    import polytask.engine.loop as loop_module
    import polytask.engine.state as state_module
    import polytask.flows.continual as flow_module

    sides = {
        "polytask": (polytask_fn, {
            "step": (loop_module, "accumulated_step"), "evaluation (per epoch)": (loop_module, "evaluate"),
            "evaluation (accuracy rows)": (flow_module, "evaluate"),
            "checkpoint serialisation": (checkpoint_module, "dumps"), "checkpoint state": (state_module.LoopState,
                                                                                          "tree"),
            "data order": (data_module.TensorBatches, "epoch")}),
        "plain+save": (plain_fn, {"evaluation": (sys.modules[__name__], "accuracy"), "torch.save": (torch, "save")}),
    }
    out: dict[str, Any] = {}
    for side, (fn, targets) in sides.items():
        rows: dict[str, list[float]] = {}
        for _ in range(runs):
            parts: dict[str, float] = {}
            with tempfile.TemporaryDirectory(dir=tmp) as d, clocked(targets, parts):
                c, t = time.process_time(), time.thread_time()
                fn(Path(d))
                total, main_thread = time.process_time() - c, time.thread_time() - t
            parts["other threads"] = total - main_thread
            parts["rest of the training thread"] = main_thread - sum(v for k, v in parts.items()
                                                                      if k != "other threads")
            parts["total"] = total
            for k, v in parts.items():
                rows.setdefault(k, []).append(v)
        out[side] = {k: round(statistics.median(v) * 1000, 1) for k, v in rows.items()}
    return out


def run_in_tmp(fn: Variant, tmp: str | None) -> dict[str, Any]:
    """``fn`` in a fresh temporary directory (removed afterwards); its outputs."""
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        return fn(Path(d))


def timed(fn: Variant, tmp: str | None) -> tuple[float, float, dict[str, Any]]:
    """(wall, CPU) seconds of ``fn`` and its outputs; the directory is made and removed outside the clocks."""
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        w, c = time.perf_counter(), time.process_time()
        out = fn(Path(d))
        return time.perf_counter() - w, time.process_time() - c, out


def interleaved(variants: dict[str, Variant], rounds: int, tmp: str | None
                ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, dict[str, Any]]]:
    """(wall, CPU) seconds of every variant in every round, the order rotated each round, after one warm-up run of
    each (whose outputs are returned: final accuracies, steps, state size)."""
    outputs = {k: run_in_tmp(fn, tmp) for k, fn in variants.items()}
    keys = list(variants)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            w, c, _ = timed(variants[k], tmp)
            times[k].append((w, c))
    return times, outputs


def memory(seed: int, tmp: str | None) -> dict[str, Any]:
    """Every registered strategy's memory after the stream (one epoch per experience) beside the model's size, on
    split-digits in the class scenario, or the task scenario for a strategy that needs the task id."""
    streams = {sc: build_stream("split-digits", {"scenario": sc}, seed) for sc in ("class", "task")}
    out: dict[str, Any] = {"model_parameters": {}, "strategies": {}}
    for sc, stream in streams.items():
        model = plain_model(stream.input_shape[0], stream.tasks[0].n_outputs)
        out["model_parameters"][sc] = sum(p.numel() for p in model.parameters()) * (len(stream.tasks) if sc == "task"
                                                                                    else 1)
    for name in STRATEGIES.names():
        params = (replay_params() if name == "replay" else None) or PARAMS.get(name, {})
        built = STRATEGIES.build(name, params, where=name)
        if name in NEEDS_ENCODER:
            out["strategies"][name] = NEEDS_ENCODER[name]
            continue
        sc = "class" if "class" in built.scenarios else "task"
        try:
            r = run_in_tmp(polytask_variant(streams[sc], name, params, 1, seed, tmp), tmp)
        except Exception as e:  # report, don't hide
            out["strategies"][name] = f"error: {type(e).__name__}: {e}"
            continue
        n_params = out["model_parameters"][sc]
        out["strategies"][name] = {"scenario": sc, "params": params, "state_numel": r["state_numel"],
                                   "added_numel": r["added_numel"],
                                   "memory_vs_model": round((r["state_numel"] + r["added_numel"]) / n_params, 4)}
    return out


def paired_rounds(stream: Stream, strategy: str, epochs: int, seed: int, rounds: int, tmp: str | None
                  ) -> list[dict[str, float]]:
    """``rounds`` pairs of wall times (polytask as configured by default, the plain loop without checkpoints) in this
    process: :func:`interleaved` with the two, the order alternating from pair to pair, after two warm-up runs of
    each."""
    params = (replay_params() or {}) if strategy == "replay" else {}
    fns = {"polytask": polytask_variant(stream, strategy, params, epochs, seed, tmp),
           "plain": plain_variant(stream, epochs, seed, False, strategy == "replay")}
    for fn in fns.values():
        run_in_tmp(fn, tmp)  # interleaved warms each up once more
    times, _ = interleaved(fns, rounds, tmp)
    return [{k: times[k][i][0] for k in fns} for i in range(rounds)]


def alternating_processes(args: argparse.Namespace) -> dict[str, Any]:
    """The headline ratio measured again in ``args.processes`` fresh processes of ``args.process_rounds`` alternating
    pairs each (:func:`paired_rounds`), pooled: a process's own state (allocator, caches, the other variants of the
    interleaved rounds) weighs less than in one long process. Per strategy: the median ratio, its spread and a 95%
    bootstrap interval of the median."""
    out: dict[str, Any] = {"processes": args.processes, "rounds_per_process": args.process_rounds}
    for s in args.strategies:
        pairs: list[dict[str, float]] = []
        for _ in range(args.processes):
            cmd = [sys.executable, __file__, "--worker", s, "--rounds", str(args.process_rounds), "--epochs",
                   str(args.epochs), "--seed", str(args.seed), *(["--tmp", args.tmp] if args.tmp else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            pairs += json.loads(done.stdout)
        out[s] = {"ratio_vs_plain": summary([p["polytask"] / p["plain"] for p in pairs], ci=True),
                  "polytask_s": summary([p["polytask"] for p in pairs]),
                  "plain_s": summary([p["plain"] for p in pairs])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10, help="epochs per experience")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each variant once per round)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", nargs="+", default=["naive", "replay"], choices=["naive", "replay"])
    ap.add_argument("--tmp", default=None, help="where the temporary run directories go (default: the system's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "continual_overhead.json"),
                    help="where the JSON is also written ('' for nowhere)")
    ap.add_argument("--no-fsync-variant", action="store_true",
                    help="also time polytask with os.fsync a no-op (diagnostic: the cost of its durable writes)")
    ap.add_argument("--durable-variant", action="store_true",
                    help="also time the plain loop writing a resumable checkpoint per epoch as polytask's guarantees "
                    "need (RNG states and position, temporary file, fsync, rename) on its training thread")
    ap.add_argument("--breakdown", type=int, default=0, metavar="RUNS",
                    help="after the rounds, RUNS instrumented runs of each side: CPU ms per component (diagnostic)")
    ap.add_argument("--processes", type=int, default=0, metavar="N",
                    help="also measure the headline ratio in N fresh processes of --process-rounds alternating pairs")
    ap.add_argument("--process-rounds", type=int, default=20)
    ap.add_argument("--worker", choices=["naive", "replay"], help=argparse.SUPPRESS)  # one process of --processes
    args = ap.parse_args()
    torch.set_num_threads(1)
    stream = build_stream("split-digits", {"scenario": "class"}, args.seed)
    if args.worker:
        print(json.dumps(paired_rounds(stream, args.worker, args.epochs, args.seed, args.rounds, args.tmp)))
        return
    variants: dict[str, Variant] = {}
    notes: dict[str, str] = {}
    for s in args.strategies:
        params: dict[str, Any] | None = {}
        if s == "replay" and (params := replay_params()) is None:
            notes[s] = "skipped: no strategy named 'replay' is registered (see `polytask continual --list`)"
            continue
        variants[f"{s}/polytask"] = polytask_variant(stream, s, params, args.epochs, args.seed, args.tmp)
        variants[f"{s}/polytask-every-epoch"] = polytask_variant(stream, s, params, args.epochs, args.seed, args.tmp,
                                                                 interval=0.0)
        if args.no_fsync_variant:
            variants[f"{s}/polytask-nofsync"] = polytask_variant(stream, s, params, args.epochs, args.seed, args.tmp,
                                                                 durable=False)
        for save, suffix in ((False, ""), (True, "+save"), ("durable", "+durable")):
            if save == "durable" and not args.durable_variant:
                continue
            variants[f"{s}/plain{suffix}"] = plain_variant(
                stream, args.epochs, args.seed, save, s == "replay")
        variants[f"{s}/plain-model"] = plain_variant(stream, args.epochs, args.seed, False, s == "replay", True)
    load_before = os.getloadavg()
    times, outputs = interleaved(variants, args.rounds, args.tmp)
    load_after = os.getloadavg()
    tmp = args.tmp or tempfile.gettempdir()
    out: dict[str, Any] = {
        "setup": f"split-digits class-IL (5 x 2 classes), MLP 64-{'-'.join(map(str, HIDDEN))}-10, batch {BATCH}, "
                 f"SGD lr {LR} momentum {MOMENTUM}, {args.epochs} epochs per experience, 1 thread; polytask = "
                 "run_strategy (engine job per experience, default checkpoint policy: a job's checkpoints at most "
                 "one a second from its start, so none here, end states at most one a second, so the last "
                 "experience's only); polytask-every-epoch: train.checkpoint_interval_s 0 (a checkpoint every "
                 "epoch, an end state every experience); plain = "
                 "hand-written loop with per-epoch validation and the accuracy row after each experience, no "
                 "checkpoint; plain+save adds a torch.save of model+optimizer per epoch; "
                 f"{args.rounds} interleaved rounds (order rotated), ratios paired per round",
        "torch": torch.__version__, "tmp": tmp, "target_median_ratio": TARGET, "cpus": os.cpu_count(),
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in load_after]},
        "headline": "ratio_vs_plain (polytask as configured by default / the loop without checkpoints, the "
                    "target), and every_epoch_ratio_vs_plain+save (both checkpointing every epoch); wall clock",
        "results": {}, "notes": notes}
    for s in args.strategies:
        if f"{s}/polytask" not in times:
            continue
        row: dict[str, Any] = {}
        base = times[f"{s}/polytask"]
        for k in [v for v in times if v.startswith(f"{s}/")]:
            row[k] = {"wall_s": summary([t[0] for t in times[k]]), "cpu_s": summary([t[1] for t in times[k]]),
                      "steps": outputs[k]["steps"],
                      "final_accuracy": [round(a, 4) for a in outputs[k]["final"]],
                      "average_accuracy": round(statistics.mean(outputs[k]["final"]), 4)}
        every = times[f"{s}/polytask-every-epoch"]
        for k in (f"{s}/plain", f"{s}/plain-model", f"{s}/plain+save", f"{s}/plain+durable"):
            if k not in times:
                continue
            other = times[k]
            for prefix, mine in (("", base), ("every_epoch_", every)):
                if prefix and k in (f"{s}/plain", f"{s}/plain-model"):
                    continue
                row[f"{prefix}ratio_vs_{k.split('/')[1]}"] = {
                    "wall": summary([a[0] / b[0] for a, b in zip(mine, other, strict=True)], ci=True),
                    "cpu": summary([a[1] / b[1] for a, b in zip(mine, other, strict=True)], ci=True)}
        if f"{s}/polytask-nofsync" in times:
            row["ratio_nofsync_vs_plain+save"] = {
                m: summary([a[j] / b[j] for a, b in zip(times[f"{s}/polytask-nofsync"], times[f"{s}/plain+save"],
                                                        strict=True)]) for j, m in enumerate(("wall", "cpu"))}
        if args.breakdown:
            row["breakdown_cpu_ms"] = breakdown(variants[f"{s}/polytask"], variants[f"{s}/plain+save"],
                                                args.breakdown, args.tmp)
        out["results"][s] = row
    if args.processes:
        out["alternating_processes"] = alternating_processes(args)
    out["memory"] = memory(args.seed, args.tmp)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
