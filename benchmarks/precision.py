"""Step time of bf16 autocast vs fp32 on the CPU, for a small MLP, measured interleaved.

Hard parameter sharing: MLP 784-512-512, K=4 linear heads (10 classes), batch 256, SGD, one thread. For each method
(a loss weighting, and an aggregator in each gradient mode) one fp32 and one bf16 variant, each with its own model
and state, are warmed up and then timed in rounds in this one process: each round runs fp32 then bf16 (the order
swapped every other round) for ``--steps-per-round`` steps, and the ratio bf16 / fp32 is taken per round. The JSON
reports per method the median seconds per step of each precision and the median ratio with its quartiles, min and
max over the rounds. CPU bf16 speed depends on the CPU's bf16 support (AVX512-BF16 / AMX); on CPUs without it
autocast is slower. Nothing is claimed here: it is whatever this machine measures.

Prints one JSON object. Usage: python benchmarks/precision.py [--rounds 15] [--steps-per-round 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from polytask.config import MethodConfig
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method, train_step
from polytask.models import build_model
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

METHODS = [("equal", "params"), ("upgrad", "params"), ("upgrad", "representation")]


def variant(method_name: str, mode: str, precision: str, k: int = 4, batch: int = 256):
    tasks = [Task(f"t{i}", "classification", 10) for i in range(k)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 784, generator=gen)
    y = {t.name: torch.randint(0, 10, (batch,), generator=gen).float() for t in tasks}
    src, rows = [TaskData(x, y)], [torch.arange(batch)]
    torch.manual_seed(0)
    model = build_model(tasks, (784,), "mlp", {"hidden": [512, 512]})
    method = build_method(MethodConfig(name=method_name, grad_mode=mode), [t.name for t in tasks])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    box = {"s": method.init(), "step": 0}

    def step() -> None:
        ctx = StepContext(box["step"], 0, generator=torch.Generator().manual_seed(box["step"]))
        _, _, box["s"] = train_step(model, method, box["s"], src, rows, tasks, opt, ctx, task_losses,
                                    precision=precision)
        box["step"] += 1
    return step


def timed(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out: dict = {"benchmark": "precision", "device": "cpu", "threads": a.threads, "rounds": a.rounds,
                 "steps_per_round": a.steps_per_round, "model": "MLP 784-512-512, 4 heads x 10 classes, batch 256",
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "methods": {}}
    for name, mode in METHODS:
        steps = {p: variant(name, mode, p) for p in ("fp32", "bf16")}
        for s in steps.values():
            timed(s, 3)  # warm-up
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(a.rounds):
            order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
            for p in order:
                times[p].append(timed(steps[p], a.steps_per_round))
        ratios = [b / f for b, f in zip(times["bf16"], times["fp32"], strict=True)]
        out["methods"][f"{name}/{mode}"] = {"fp32_s_per_step": statistics.median(times["fp32"]),
                                            "bf16_s_per_step": statistics.median(times["bf16"]),
                                            "bf16_over_fp32": quartiles(ratios)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
