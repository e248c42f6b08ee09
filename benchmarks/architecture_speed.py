"""Parameter count and forward+backward time of every architecture against shared-bottom (``hard``) at an equal
parameter count, measured interleaved, as JSON (issue 11).

Problem: three tasks (two 2-class classifications and a regression) on 128 input features, batch 256, one CPU
thread; the summed loss's forward and backward (``zero_grad``, forward, loss, ``backward``), no optimiser step.
Architectures run on an MLP backbone with one hidden layer; ``mtan`` (which attends over a conv backbone's feature
maps) on the ``lenet`` backbone over 1 x 16 x 16 inputs, against ``hard`` on the same backbone. Equal parameter
count: one scale f multiplies the backbone's width and every width parameter of the architecture (its parameters
named ``*hidden*``, ``*dim*``, ``*width*``: expert widths, embedding and interest widths, ...), chosen by bisection so
that the parameter count is the closest to the ``hard`` model's (reported, with the relative difference and the
count at the defaults).
Timing: every round times each architecture for ``--steps`` steps in an order rotated from round to round; an
architecture's ratio is taken per round against ``hard`` of the same round (and the same backbone); medians with
quartiles, min and max over the rounds.

    python benchmarks/architecture_speed.py [--archs mmoe ple ...] [--rounds 15] [--steps 5] [--width 512]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from step_time import summary

from polytask.models import ARCHITECTURES, build_model
from polytask.tasks import Task

TASKS = [Task("click", "classification", 2), Task("buy", "classification", 2), Task("dwell", "regression", 1)]
BATCH, INPUTS = 256, 128
CONV = {"mtan"}  # architectures over a conv backbone's feature maps


WIDTH_WORDS = ("hidden", "dim", "width")


def backbone(arch: str, width: int) -> tuple[str, dict[str, Any], tuple[int, ...]]:
    if arch in CONV:
        return "lenet", {"channels": [8, 16], "hidden": width}, (1, 16, 16)
    return "mlp", {"hidden": [width]}, (INPUTS,)


def scaled_params(arch: str, f: float) -> dict[str, Any]:
    """The architecture's own width parameters (names with hidden/dim/width; ints or lists of ints) at ``f`` times
    their defaults."""
    out: dict[str, Any] = {}
    for name, field in ARCHITECTURES.get(arch).params.model_fields.items():
        if not any(w in name for w in WIDTH_WORDS):
            continue
        d = field.get_default(call_default_factory=True)
        if isinstance(d, int) and not isinstance(d, bool):
            out[name] = max(1, round(d * f))
        elif isinstance(d, list) and d and all(isinstance(v, int) for v in d):
            out[name] = [max(1, round(v * f)) for v in d]
    return out


def build(arch: str, width: int, f: float = 1.0, base: str | None = None) -> torch.nn.Module:
    """``arch`` on the backbone of ``base`` (default its own) ``width`` wide, its own widths scaled by ``f``."""
    name, params, shape = backbone(base or arch, width)
    return build_model(TASKS, shape, name, params, arch, scaled_params(arch, f))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched(arch: str, width: int, target: int) -> float:
    """The scale f of every width (the backbone's ``width`` x f and the architecture's own) whose model has the
    parameter count closest to ``target`` (bisection on f; counts rise with f)."""
    def count(f: float) -> int:
        return n_params(build(arch, max(1, round(width * f)), f))

    lo, hi = 1 / 64, 1.0
    while count(hi) < target and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda f: abs(count(f) - target))


def step_fn(model: torch.nn.Module, arch: str) -> Callable[[], None]:
    shape = backbone(arch, 1)[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=g)
    y = {"click": torch.randint(0, 2, (BATCH,), generator=g), "buy": torch.randint(0, 2, (BATCH,), generator=g),
         "dwell": torch.randn(BATCH, generator=g)}

    def fn() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = (torch.nn.functional.cross_entropy(out["click"], y["click"])
                + torch.nn.functional.cross_entropy(out["buy"], y["buy"])
                + torch.nn.functional.mse_loss(out["dwell"][:, 0], y["dwell"]))
        aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
    return fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="*", default=None, help="default: every registered architecture")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--width", type=int, default=512, help="hard's backbone width (sets the parameter budget)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    archs = [a for a in (args.archs or ARCHITECTURES.names()) if a != "hard"]
    variants: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    for base in sorted({"lenet" if a in CONV else "mlp" for a in archs}):
        key = f"hard@{base}"
        ref_arch = "mtan" if base == "lenet" else "hard"
        torch.manual_seed(0)
        model = build("hard", args.width, base=ref_arch)
        variants[key] = step_fn(model, ref_arch)
        info[key] = {"backbone": base, "width": args.width, "params": n_params(model)}
    for arch in archs:
        base = "lenet" if arch in CONV else "mlp"
        target = info[f"hard@{base}"]["params"]
        f = matched(arch, args.width, target)
        torch.manual_seed(0)
        model = build(arch, max(1, round(args.width * f)), f)
        variants[arch] = step_fn(model, arch)
        p = n_params(model)
        info[arch] = {"backbone": base, "scale": round(f, 4), "width": max(1, round(args.width * f)),
                      "arch_params": scaled_params(arch, f), "params": p, "params_vs_hard": round(p / target - 1, 4),
                      "params_at_defaults": n_params(build(arch, args.width))}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = time.perf_counter()
            for _ in range(args.steps):
                variants[k]()
            times[k].append((time.perf_counter() - t) / args.steps)
    out: dict[str, Any] = {}
    for k in names:
        ref = f"hard@{info[k]['backbone']}"
        out[k] = {**info[k], "ms": summary([t * 1e3 for t in times[k]]),
                  "ratio_to_hard": summary([a / b for a, b in zip(times[k], times[ref], strict=True)])}
    print(json.dumps({"benchmark": "architecture_speed", "batch": BATCH, "tasks": [t.name for t in TASKS],
                      "rounds": args.rounds, "steps_per_round": args.steps, "torch_threads": 1,
                      "note": "forward + backward of the summed loss; ratio per round against hard on the same "
                              "backbone; median and spread over rounds", "results": out}, indent=1))


if __name__ == "__main__":
    main()
