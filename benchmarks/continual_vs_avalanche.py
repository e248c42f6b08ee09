"""polytask continual beside Avalanche (avalanche-lib) on the same split-digits stream (issue 10).

Both sides train the same rows: polytask builds its split-digits stream for each seed (class-incremental and
task-incremental, 5 experiences of 2 classes) and exports every experience's train/val/test tensors to an ``.npz``;
an Avalanche worker (this file with ``--worker``, run as a subprocess by the Python of a separate environment that
has avalanche-lib, never polytask's) builds its benchmark from those tensors
(``create_generic_benchmark_from_tensor_lists``; task labels 0..4 in the task scenario, 0 in the class one).

Hyper-parameters (issue 10): MLP 64-256-256 with one head over the 10 classes (class scenario) or one 2-way head per
experience (task scenario: Avalanche's ``MultiHeadClassifier``), SGD lr 0.01 momentum 0.9 with a fresh optimiser per
experience (Avalanche resets it), batch 32, ``--epochs`` (10) epochs per experience, one thread. Runs:

- ``class/naive``: fine-tuning, class-incremental (Avalanche ``Naive``).
- ``class/replay``: replay with a memory of 200 rows and 32 replayed rows per step, class-incremental (polytask
  ``replay`` {size: 200, batch_size: 32}: reservoir buffer filled once an experience is trained; Avalanche ``Replay``
  mem_size 200: its ``ReplayDataLoader`` adds train_mb_size = 32 memory rows to each batch, experience-balanced
  buffer).
- ``task/naive``: fine-tuning, task-incremental (multi-head, task label given at test time).

The same work on each side: after each epoch the experience's validation rows are evaluated (polytask's engine does
this always; Avalanche with ``eval_every=1`` on that experience's validation stream), after each experience every
experience's test rows (polytask's accuracy row; Avalanche ``strategy.eval(test_stream)``). polytask also writes
its per-epoch checkpoints and the end-of-experience state (it cannot be turned off); Avalanche writes nothing.

For every seed the polytask runs (in this process) and the Avalanche worker's runs (one subprocess per seed, after
an untimed warm-up run in it, timing only training and evaluation, not imports or building the benchmark) go one
after the other, which side first alternating from seed to seed. Reported per run: wall and CPU seconds, the final
accuracy of every experience and their mean (``average_accuracy``, polytask's metric; Avalanche's
``Top1_Acc_Stream``, the accuracy over all test rows, beside it), and over the seeds the mean ± standard deviation
of the average accuracy and the median (min, max) of the times and of the ratio polytask / Avalanche (``--repeats``
timed runs per seed and side, paired in order; the accuracies are each seed's first run's).

Avalanche needs its own environment (it pins other versions of torch and torchvision): ``python3 -m venv /tmp/avl &&
/tmp/avl/bin/pip install torch==2.13.0 && /tmp/avl/bin/pip install avalanche-lib``, then ``pip install --no-deps
torch==2.13.0 torchvision==0.28.0`` in it to put back polytask's torch (avalanche-lib pulls a newer one). The
torchvision wheel's compiled ops do not load beside a CPU torch; importing torchvision then fails on the fake
kernels it registers for ``torchvision::nms`` and ``qnms``, so the worker defines those two operator schemas first
(:func:`torchvision_standin`; nothing here calls them).

Prints one JSON object. Usage: python benchmarks/continual_vs_avalanche.py [--seeds 0 1 2] [--epochs 10]
[--repeats 1] [--avalanche-python /tmp/avl/bin/python] [--configs class/naive class/replay task/naive]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CONFIGS = {"class/naive": ("class", "naive"), "class/replay": ("class", "replay"), "task/naive": ("task", "naive")}
HIDDEN = [256, 256]
BATCH, LR, MOMENTUM, MEMORY, EVAL_BATCH = 32, 0.01, 0.9, 200, 1024
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- polytask's side


def streams(seed: int) -> dict[str, Any]:
    from polytask.continual.stream import build_stream

    return {s: build_stream("split-digits", {"scenario": s}, seed) for s in ("class", "task")}


def export(built: dict[str, Any], path: Path) -> None:
    """Every experience's tensors of both scenarios: ``{scenario}/e{i}/{split}/x`` (float32) and ``/y`` (int64)."""
    arrays = {}
    for scenario, stream in built.items():
        for i, e in enumerate(stream.experiences):
            (task,) = e.tasks
            for split in SPLITS:
                (src,) = e.suite.splits[split]
                arrays[f"{scenario}/e{i}/{split}/x"] = src.x.numpy().astype(np.float32)
                arrays[f"{scenario}/e{i}/{split}/y"] = src.y[task.name].numpy().astype(np.int64)
    np.savez(path, **arrays)


def polytask_run(stream: Any, strategy: str, epochs: int, seed: int) -> dict[str, Any]:
    from polytask.continual.config import ContinualConfig, StrategyConfig
    from polytask.flows.continual import run_strategy

    cfg = ContinualConfig.model_validate({
        "model": {"backbone": "mlp", "backbone_params": {"hidden": HIDDEN}},
        "train": {"epochs": epochs, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "threads": 1,
                  "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM}}})
    params = {"size": MEMORY, "batch_size": BATCH} if strategy == "replay" else {}
    with tempfile.TemporaryDirectory() as d:
        w, c = time.perf_counter(), time.process_time()
        r = run_strategy(cfg, stream, StrategyConfig(name=strategy, params=params), seed, Path(d) / "job",
                         _quiet())
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    final = r["accuracy"][-1]
    return {"wall_s": wall, "cpu_s": cpu, "final": final, "average_accuracy": sum(final) / len(final),
            "state_numel": r["state_numel"]}


def _quiet() -> Any:
    from polytask.engine.progress import Reporter

    return Reporter(quiet=True)


# ---------------------------------------------------------------- Avalanche's side (runs in the other environment)


def torchvision_standin() -> Any:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` when torchvision's compiled ops are not loaded (a CUDA
    wheel beside a CPU torch): torchvision registers fake kernels for them at import and fails when they are not
    defined. Returns the library holding the definitions (it must stay alive), or None when they exist."""
    try:
        torch.ops.torchvision.nms  # noqa: B018
        return None
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return lib


def mlp(n_out: int | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    n_in = 64
    for w in HIDDEN:
        layers += [nn.Linear(n_in, w), nn.ReLU()]
        n_in = w
    return nn.Sequential(*layers, *([nn.Linear(n_in, n_out)] if n_out else []))


def avalanche_run(data: Any, scenario: str, strategy: str, epochs: int, seed: int) -> dict[str, Any]:
    from avalanche.benchmarks.scenarios.deprecated.generic_benchmark_creation import (
        create_generic_benchmark_from_tensor_lists,
    )
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive, Replay

    class MultiHead(MultiTaskModule):
        """The shared MLP and a 2-way head per task label (Avalanche's multi-head classifier)."""

        def __init__(self) -> None:
            super().__init__()
            self.features = mlp(None)
            self.classifier = MultiHeadClassifier(HIDDEN[-1], initial_out_features=2)

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.classifier(self.features(x), task_label)

    n = sum(1 for k in data.files if k.startswith(f"{scenario}/") and k.endswith("/train/x"))

    def tensors(split: str) -> list[list[torch.Tensor]]:
        return [[torch.from_numpy(data[f"{scenario}/e{i}/{split}/{v}"]) for v in "xy"] for i in range(n)]

    labels = list(range(n)) if scenario == "task" else [0] * n
    bm = create_generic_benchmark_from_tensor_lists(train_tensors=tensors("train"), test_tensors=tensors("test"),
                                                    other_streams_tensors={"val": tensors("val")}, task_labels=labels)
    RNGManager.set_random_seeds(seed)
    model: nn.Module = MultiHead() if scenario == "task" else mlp(10)
    kw = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
          "criterion": nn.CrossEntropyLoss(), "train_mb_size": BATCH, "train_epochs": epochs,
          "eval_mb_size": EVAL_BATCH, "device": "cpu", "eval_every": 1,
          "evaluator": EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])}
    strat = Replay(mem_size=MEMORY, **kw) if strategy == "replay" else Naive(**kw)
    w, c = time.perf_counter(), time.process_time()
    for i, exp in enumerate(bm.train_stream):
        strat.train(exp, eval_streams=[bm.val_stream[i]])
        res = strat.eval(bm.test_stream)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    final = [float(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{labels[i]:03d}/Exp{i:03d}"]) for i in range(n)]
    stream_acc = next(float(v) for k, v in res.items() if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))
    return {"wall_s": wall, "cpu_s": cpu, "final": final, "average_accuracy": sum(final) / n,
            "stream_accuracy": stream_acc}


def worker(args: argparse.Namespace) -> None:
    """The Avalanche side: one untimed warm-up run, then every config of ``--configs``; one JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    keep = torchvision_standin()  # noqa: F841  (the definitions live as long as the library object)
    import avalanche

    data = np.load(args.worker)
    avalanche_run(data, "class", "naive", 1, args.seeds[0])
    out: dict[str, Any] = {"avalanche": avalanche.__version__, "torch": torch.__version__, "runs": {}}
    for config in args.configs:
        out["runs"][config] = [avalanche_run(data, *CONFIGS[config], args.epochs, args.seeds[0])
                               for _ in range(args.repeats)]
    print(json.dumps(out))


# ---------------------------------------------------------------- both, side by side


def spread(xs: list[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits)}


def mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10, help="epochs per experience")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each seed and config on each side")
    ap.add_argument("--avalanche-python", default="/tmp/avl/bin/python")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the .npz, in the Avalanche environment
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "setup": f"split-digits (5 x 2 classes; polytask's rows for each seed), MLP 64-{'-'.join(map(str, HIDDEN))} "
                 f"(one 10-way head: class; a 2-way head per experience: task), SGD lr {LR} momentum {MOMENTUM}, "
                 f"fresh optimiser per experience, batch {BATCH}, {args.epochs} epochs per experience, replay memory "
                 f"{MEMORY} with {BATCH} replayed rows a step, per-epoch validation of the experience and the test "
                 "row after each experience on both sides; polytask also writes its checkpoints; 1 thread",
        "torch": torch.__version__, "configs": args.configs, "seeds": args.seeds, "repeats": args.repeats,
        "issue_reference_avalanche": {"class/replay": "0.877 +- 0.004", "task/naive": "0.975 +- 0.001"},
        "runs": {}}
    if not Path(args.avalanche_python).exists():
        out["avalanche"] = f"not run: {args.avalanche_python} does not exist (see this file's docstring)"
    polytask_runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    avalanche_runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    polytask_run(streams(args.seeds[0])["class"], "naive", 1, args.seeds[0])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for k, seed in enumerate(args.seeds):
            built = streams(seed)
            npz = Path(tmp) / f"split-digits-s{seed}.npz"
            export(built, npz)

            def ours(built: dict[str, Any] = built, seed: int = seed) -> None:
                for c in args.configs:
                    scenario, strategy = CONFIGS[c]
                    polytask_runs[c] += [polytask_run(built[scenario], strategy, args.epochs, seed)
                                         for _ in range(args.repeats)]

            def theirs(npz: Path = npz, seed: int = seed) -> None:
                if "avalanche" in out and isinstance(out["avalanche"], str):
                    return
                proc = subprocess.run(
                    [args.avalanche_python, os.path.abspath(__file__), "--worker", str(npz), "--seeds", str(seed),
                     "--epochs", str(args.epochs), "--repeats", str(args.repeats), "--configs", *args.configs],
                    capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
                if proc.returncode:
                    out["avalanche"] = f"failed (seed {seed}): {proc.stderr.strip()[-2000:]}"
                    return
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                out["avalanche"] = {"version": got["avalanche"], "torch": got["torch"]}
                for c, r in got["runs"].items():
                    avalanche_runs[c] += r

            for side in ((ours, theirs) if k % 2 == 0 else (theirs, ours)):
                side()
    for c in args.configs:
        row: dict[str, Any] = {}
        for name, runs in (("polytask", polytask_runs[c]), ("avalanche", avalanche_runs[c])):
            if not runs:
                continue
            firsts = runs[::args.repeats]  # one run per seed (repeats train the same model again)
            row[name] = {"average_accuracy": mean_sd([r["average_accuracy"] for r in firsts]),
                         "wall_s": spread([r["wall_s"] for r in runs]), "cpu_s": spread([r["cpu_s"] for r in runs]),
                         "per_seed": [{"average_accuracy": round(r["average_accuracy"], 4),
                                       "final": [round(a, 4) for a in r["final"]],
                                       **({"stream_accuracy": round(r["stream_accuracy"], 4)}
                                          if "stream_accuracy" in r else {}),
                                       "wall_s": round(r["wall_s"], 3), "cpu_s": round(r["cpu_s"], 3)}
                                      for r in firsts]}
        if polytask_runs[c] and len(avalanche_runs[c]) == len(polytask_runs[c]):
            pairs = list(zip(polytask_runs[c], avalanche_runs[c], strict=True))
            row["ratio_polytask_vs_avalanche"] = {"wall": spread([p["wall_s"] / a["wall_s"] for p, a in pairs]),
                                                  "cpu": spread([p["cpu_s"] / a["cpu_s"] for p, a in pairs])}
            ours = [p["average_accuracy"] for p, _ in pairs[::args.repeats]]
            theirs_ = [a["average_accuracy"] for _, a in pairs[::args.repeats]]
            diff = statistics.mean(ours) - statistics.mean(theirs_)
            se = (statistics.variance(ours) / len(ours) + statistics.variance(theirs_) / len(ours)) ** 0.5 \
                if len(ours) > 1 else float("nan")
            row["accuracy_difference"] = {"polytask_minus_avalanche": round(diff, 4), "standard_error": round(se, 4),
                                          "within_two_standard_errors": bool(abs(diff) <= 2 * se)}
        out["runs"][c] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
