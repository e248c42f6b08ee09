"""Training throughput (tokens/s) of polytask's engine vs a plain PyTorch loop on the same in-context model and the
same prompts (polytask issue 13; target: engine time <= 1.1x the plain loop's).

Both train a fresh :class:`polytask.icl.model.FunctionModel` (same seed, same initial weights) with Adam on the
batches of :class:`polytask.icl.train.PromptBatches` (linear regression; prompts drawn per (seed, epoch, step)), for
``--epochs`` x ``--steps`` steps. The engine runs its whole job: the equal method over the family's loss, one
validation pass and one checkpoint per epoch (what a real run pays); the plain loop is forward, MSE, backward,
Adam step. Runs are interleaved (plain, engine, plain, engine, ...) in one process with one torch thread; prints
the median tokens/s of each, the median of the per-round ratios and its spread, and the load average.
Tokens are the interleaved sequence's positions (2 n per prompt).

Usage: python benchmarks/icl_throughput.py [--rounds 5] [--steps 40] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from polytask.config import MethodConfig
from polytask.engine.loop import train_job
from polytask.engine.optim import optimizer
from polytask.engine.state import seed_everything
from polytask.engine.step import build_method
from polytask.icl.functions import LinearRegression
from polytask.icl.train import IclJob, Schedule, icl_spec


def job(args: argparse.Namespace, where: Path) -> IclJob:
    return IclJob("bench", build_method(MethodConfig(name="equal"), ["linear_regression"]),
                  optimizer("adam", {"lr": 1e-3}), epochs=args.epochs, steps=args.steps, batch_size=args.batch,
                  points=Schedule(args.points, args.points), checkpoint=where, n_embd=args.embd, n_layer=args.layers,
                  n_head=args.heads, eval_prompts=args.eval_prompts)


def plain(args: argparse.Namespace) -> float:
    """Seconds of a plain loop over the same model and batches."""
    spec = icl_spec([LinearRegression(dim=args.dim)], job(args, Path(tempfile.mkdtemp())))
    seed_everything(spec.seed)
    model = spec.model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for e in range(args.epochs):
        batches = spec.data.epoch(spec.seed, e)
        for s in range(len(batches)):
            src = batches[s].sources[0]
            pred = model(src.x, ["linear_regression"])["linear_regression"]
            loss = ((pred - src.y["linear_regression"]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def engine(args: argparse.Namespace) -> float:
    """Seconds of the engine's job (validation and checkpoints included)."""
    with tempfile.TemporaryDirectory() as d:
        spec = icl_spec([LinearRegression(dim=args.dim)], job(args, Path(d)))
        t0 = time.perf_counter()
        train_job(spec)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--dim", type=int, default=5)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--eval-prompts", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokens = args.epochs * args.steps * args.batch * 2 * args.points
    plain(args), engine(args)  # warm-up (imports, allocator)
    times: dict[str, list[float]] = {"plain": [], "engine": []}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        times["plain"].append(plain(args))
        times["engine"].append(engine(args))
        load.append(os.getloadavg())
    ratios = [e / p for e, p in zip(times["engine"], times["plain"], strict=True)]
    out = {"benchmark": "icl_throughput", "args": vars(args), "tokens_per_run": tokens,
           "tokens_per_s": {k: statistics.median(tokens / t for t in v) for k, v in times.items()},
           "seconds": times, "ratio_engine_over_plain": {"median": statistics.median(ratios), "min": min(ratios),
                                                        "max": max(ratios)},
           "target": "<= 1.1", "threads": 1, "load_average_1_5_15": load}
    print(json.dumps(out))
    (Path(__file__).parent / "results" / "icl_throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
