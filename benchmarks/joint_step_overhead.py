"""Overhead of ``polytask.JointStep`` (the user's own loop) over the engine's step, for every method and mode.

The problem is ``step_time.py``'s (MLP 784-512-512, K linear heads with 10 classes, batch 256, SGD, one thread).
For every method (aggregators in both gradient modes) two variants train their own copy of the same model: the
engine's ``train_step``, and a plain PyTorch loop step (the user's forward: encoder, heads, the same masked losses;
``mtl.backward(losses, features=z, shared=encoder, heads=heads)``; ``opt.step()``; ``after_step`` where the method
needs it). The user's forward computes what the engine's does in the same order (every head, then the losses):
computing each loss right after its head measured ~3-5% slower at K = 10 with a plain ``loss.backward()`` too, a cost
of the forward, not of JointStep.

After a warm-up, every round times each method's pair back to back (engine then JointStep in even rounds,
JointStep then engine in odd ones; the methods in an order rotated from round to round), a burst of
``--steps-per-round`` steps each, on two clocks: wall time and the CPU time of this (the only compute) thread,
which other processes on a shared machine do not inflate. A method's ratio JointStep / engine is taken per round
from the adjacent bursts; the JSON gives its median and spread (quartiles, min, max) over the rounds, per clock.
The target: median CPU-time ratio <= 1.05 (the wall-time one is reported beside it).

Prints one JSON object. Usage: python benchmarks/joint_step_overhead.py [--ks 2 5 10] [--methods a b]
[--rounds 20] [--steps-per-round 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from step_time import PARAMS, fresh_model, polytask_step, problem, summary

from polytask import JointStep
from polytask.config import MethodConfig
from polytask.engine.step import masked_loss
from polytask.methods import load_all

Step = Callable[[], None]
TARGET = 1.05


def joint_step(k: int, cfg: MethodConfig) -> Step:
    """One step of a plain PyTorch loop driving the method through JointStep."""
    tasks, src, rows = problem(k)
    model, opt = fresh_model(tasks)
    mtl = JointStep(cfg.name, [t.name for t in tasks], mode=cfg.grad_mode, params=cfg.params)
    x, y = src[0].x, src[0].y

    def forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = rows[0]
        z = model.encoder(x[r])
        preds = {t.name: model.heads[t.name](z) for t in tasks}  # all heads, then the losses: the engine's order
        return z, {t.name: masked_loss(t, preds[t.name], y[t.name][r]) for t in tasks}

    def val_losses() -> dict[str, torch.Tensor]:  # as step_time's engine variant: the training batch
        with torch.no_grad():
            return forward()[1]

    def fn() -> None:
        opt.zero_grad(set_to_none=True)
        z, losses = forward()
        mtl.backward(losses, features=z, shared=model.encoder, heads=model.heads,
                     val_losses=val_losses if mtl.needs_val else None)
        opt.step()
        if mtl.needs_after_step:
            with torch.no_grad():
                mtl.after_step(forward()[1])
    return fn


def burst(fn: Step, steps: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per step over ``steps`` consecutive steps."""
    w, c = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - w) / steps, (time.thread_time() - c) / steps


def paired_rounds(pairs: dict[str, tuple[Step, Step]], rounds: int, steps: int, warmup: int
                  ) -> tuple[dict[str, list[tuple[float, float, float, float]]], dict[str, str]]:
    """Per method and round: (engine wall, JointStep wall, engine CPU, JointStep CPU) seconds per step, the two
    bursts adjacent; methods failing in warm-up are reported by their error and dropped."""
    errors: dict[str, str] = {}
    for key, (eng, js) in list(pairs.items()):
        try:
            for _ in range(warmup):
                eng()
                js()
        except Exception as e:  # report, don't hide
            errors[key] = f"error: {type(e).__name__}: {e}"
            del pairs[key]
    keys = list(pairs)
    out: dict[str, list[tuple[float, float, float, float]]] = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % max(len(keys), 1)
        for key in keys[shift:] + keys[:shift]:
            eng, js = pairs[key]
            if r % 2 == 0:
                (ew, ec), (jw, jc) = burst(eng, steps), burst(js, steps)
            else:
                (jw, jc), (ew, ec) = burst(js, steps), burst(eng, steps)
            out[key].append((ew, jw, ec, jc))
    return out, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (each variant once per round)")
    ap.add_argument("--steps-per-round", type=int, default=2, help="consecutive steps timed per variant and round")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    registry = load_all()
    names = args.methods or registry.names()
    out: dict = {"setup": "MLP 784-512-512, K linear heads, batch 256, SGD, 1 thread; ratio = JointStep step (user's "
                          "forward + backward + opt.step) / engine train_step, paired per round; "
                          f"{args.rounds} rounds, each timing every method's two variants back to back "
                          f"({args.steps_per_round} steps each, which first alternating, methods rotated); median "
                          "and spread (quartiles, min, max) over rounds of the CPU-time and wall-time ratios",
                 "torch": torch.__version__, "target_median_ratio": TARGET, "results": {}}
    all_medians: list[float] = []
    for k in args.ks:
        pairs: dict[str, tuple[Step, Step]] = {}
        for name in names:
            kind = registry.get(name).extra.get("kind")
            for mode in (["params", "representation"] if kind == "aggregator" else ["params"]):
                key = name if kind != "aggregator" else f"{name}/{mode}"
                cfg = MethodConfig(name=name, grad_mode=mode, params=PARAMS.get(name, lambda k: {})(k))
                pairs[key] = (polytask_step(k, cfg), joint_step(k, cfg))
        times, errors = paired_rounds(pairs, args.rounds, args.steps_per_round, args.warmup)
        row: dict = dict(errors)
        for key, ts in times.items():
            row[key] = {"engine_ms": round(statistics.median(t[0] for t in ts) * 1e3, 2),
                        "cpu_ratio": summary([t[3] / t[2] for t in ts]),
                        "wall_ratio": summary([t[1] / t[0] for t in ts])}
            all_medians.append(row[key]["cpu_ratio"]["median"])
        out["results"][f"K={k}"] = row
    out["over_target"] = {f"{kk}:{m}": v["cpu_ratio"]["median"] for kk, row in out["results"].items()
                          for m, v in row.items() if isinstance(v, dict) and v["cpu_ratio"]["median"] > TARGET}
    out["median_of_medians"] = round(statistics.median(all_medians), 3) if all_medians else None
    out["max_median"] = round(max(all_medians), 3) if all_medians else None
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
