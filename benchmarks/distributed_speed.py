"""Step time of data-parallel training: 1 process vs N processes on one global batch, and the reductions' share.

    python benchmarks/distributed_speed.py --world 2 --rounds 5 > benchmarks/results/distributed_speed.json

Each round trains every method a few steps in one process, then the same steps in ``--world`` processes started by
torchrun (gloo on the CPU, NCCL with ``--device cuda``), so the two sides are interleaved (A, B, A, B, ...). Inside
each process the first ``--warmup`` steps are not timed; a step is ``engine.step.accumulated_step`` on the rank's
share of the global batch (one process: ``train_step``, the same code the loop runs). The reductions' cost is the
time spent in the ``Collective`` calls (all-reduce, all-gather), measured on rank 0; it includes waiting for the
slower rank. Prints JSON: per method the median step time of each side with its spread (min, max over rounds), the
speed-up (1-process time / N-process time) and the reductions' share of the N-process step.
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

import torch

METHODS = {"equal": ("equal", "params"), "famo": ("famo", "params"), "upgrad-params": ("upgrad", "params"),
           "upgrad-representation": ("upgrad", "representation"), "pcgrad-params": ("pcgrad", "params"),
           "nashmtl-representation": ("nashmtl", "representation")}


def worker(args: argparse.Namespace) -> None:
    """Time every method's steps in this process (a torchrun rank, or alone); rank 0 writes JSON to args.out."""
    from polytask.config import MethodConfig
    from polytask.engine import distributed
    from polytask.engine.distributed import Collective
    from polytask.engine.loop import task_losses
    from polytask.engine.step import accumulated_step, build_method
    from polytask.models import build_model
    from polytask.tasks import Task, TaskData
    from polytask.weighting import StepContext

    torch.set_num_threads(args.threads)
    comm = distributed.init_from_env()
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    spent = [0.0]

    def timed(fn):
        def run(*a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent[0] += time.perf_counter() - t0
            return out
        return run

    for name in ("sum", "sum_grads", "gather_rows"):
        setattr(Collective, name, timed(getattr(Collective, name)))
    tasks = [Task(f"t{k}", "regression", 1) for k in range(args.tasks)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.dim, generator=gen)
    src = TaskData(x.to(device), {t.name: torch.randn(args.batch, 1, generator=gen).to(device) for t in tasks})
    rows = torch.arange(args.batch, device=device)
    out = {}
    for label, (method_name, mode) in METHODS.items():
        torch.manual_seed(0)
        model = build_model(tasks, (args.dim,), "mlp", {"hidden": [args.width] * args.depth}).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        method = build_method(MethodConfig(name=method_name, grad_mode=mode), [t.name for t in tasks])
        state = method.init()
        times = []
        for step in range(args.warmup + args.steps):
            spent[0] = 0.0
            ctx = StepContext(step, 0, None, None, args.warmup + args.steps, torch.Generator().manual_seed(step))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _, _, state = accumulated_step(model, method, state, [([src], [rows])], tasks, opt, ctx, task_losses,
                                           comm=comm)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append((time.perf_counter() - t0, spent[0]))
        out[label] = {"step_s": statistics.median(t for t, _ in times),
                      "reduce_s": statistics.median(r for _, r in times)}
    if comm is None or comm.rank == 0:
        Path(args.out).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=1024, help="global batch (rows)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    common = [__file__, "--worker", "--batch", str(args.batch), "--dim", str(args.dim), "--width", str(args.width),
              "--depth", str(args.depth), "--tasks", str(args.tasks), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rounds: dict[str, list[dict]] = {"one": [], "many": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, launcher in (("one", []), ("many", ["-m", "torch.distributed.run", "--standalone",
                                                           "--nproc-per-node", str(args.world)])):
                out = Path(tmp) / f"{side}{r}.json"
                subprocess.run([sys.executable, *launcher, *common, "--out", str(out)], env=env, check=True)
                rounds[side].append(json.loads(out.read_text()))
    result: dict = {"world": args.world, "device": args.device, "rounds": args.rounds, "steps": args.steps,
                    "model": f"mlp {args.dim}->{args.width}x{args.depth}, {args.tasks} regression heads",
                    "global_batch": args.batch, "threads_per_process": args.threads,
                    "load": os.getloadavg(), "methods": {}}
    if args.device == "cuda":
        result["card"] = torch.cuda.get_device_name(0)
    for m in METHODS:
        one = [r[m]["step_s"] for r in rounds["one"]]
        many = [r[m]["step_s"] for r in rounds["many"]]
        speedup = [a / b for a, b in zip(one, many, strict=True)]
        share = [r[m]["reduce_s"] / r[m]["step_s"] for r in rounds["many"]]
        result["methods"][m] = {
            "step_ms_1": [1e3 * statistics.median(one), 1e3 * min(one), 1e3 * max(one)],
            f"step_ms_{args.world}": [1e3 * statistics.median(many), 1e3 * min(many), 1e3 * max(many)],
            "speedup": [statistics.median(speedup), min(speedup), max(speedup)],
            "reduction_share": [statistics.median(share), min(share), max(share)]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
