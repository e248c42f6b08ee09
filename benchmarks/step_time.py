"""Time per training step of every method, as a ratio to the plain summed-loss step in the same run.

Hard parameter sharing: MLP 784-512-512, K linear heads (10 classes), batch 256, SGD, one thread.
Prints one JSON object. Usage: python benchmarks/step_time.py [--ks 2 5 10] [--methods a b] [--steps 20]
Where torchjd is installed, its ``mtl_backward`` with the same aggregator is timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from polytask.config import MethodConfig
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method, train_step
from polytask.methods import load_all
from polytask.models import build_model
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

PARAMS = {"static": lambda k: {"weights": {f"t{i}": 1.0 for i in range(k)}}}
TORCHJD_ARGS = {"cagrad": lambda k: {"c": 0.4}, "nashmtl": lambda k: {"n_tasks": k}}
TORCHJD = {"mean": "Mean", "sum": "Sum", "mgda": "MGDA", "pcgrad": "PCGrad", "cagrad": "CAGrad",
           "imtl_g": "IMTLG", "nashmtl": "NashMTL", "aligned_mtl": "AlignedMTL", "upgrad": "UPGrad",
           "dualproj": "DualProj", "graddrop": "GradDrop", "config": "ConFIG"}


DEVICE = torch.device("cpu")


def problem(k: int, batch: int = 256):
    tasks = [Task(f"t{i}", "classification", 10) for i in range(k)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 784, generator=gen).to(DEVICE)
    y = {t.name: torch.randint(0, 10, (batch,), generator=gen).float().to(DEVICE) for t in tasks}
    return tasks, [TaskData(x, y)], [torch.arange(batch, device=DEVICE)]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t) / steps


def polytask_step(k: int, method_cfg: MethodConfig | None, steps: int) -> float:
    tasks, src, rows = problem(k)
    torch.manual_seed(0)
    model = build_model(tasks, (784,), "mlp", {"hidden": [512, 512]}).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if method_cfg is None:  # the plain step: one backward of the summed loss
        def fn():
            opt.zero_grad(set_to_none=True)
            task_losses(model, src, rows, tasks).sum().backward()
            opt.step()
        return time_steps(fn, steps)
    method = build_method(method_cfg, [t.name for t in tasks])
    state = {"s": method.init(), "i": 0}

    def val_losses():  # CoBa watches validation losses; the benchmark reuses the training batch
        with torch.no_grad():
            return task_losses(model, src, rows, tasks)

    def fn():
        ctx = StepContext(state["i"], 0, None, val_losses, 100, torch.Generator().manual_seed(state["i"]))
        _, _, state["s"] = train_step(model, method, state["s"], src, rows, tasks, opt, ctx, task_losses)
        state["i"] += 1
    return time_steps(fn, steps)


def torchjd_step(k: int, name: str, steps: int) -> float | None:
    """torchjd's own MTL step (>= 0.18: autojac.mtl_backward, then jac_to_grad with the aggregator)."""
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    cls = getattr(aggregation, TORCHJD.get(name, ""), None)
    if cls is None:
        return None
    tasks, src, _rows = problem(k)
    torch.manual_seed(0)
    model = build_model(tasks, (784,), "mlp", {"hidden": [512, 512]}).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    try:
        aggregator = cls(**TORCHJD_ARGS.get(name, lambda k: {})(k))
    except Exception as e:  # e.g. an optional solver torchjd needs is not installed
        print(f"torchjd {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    shared = list(model.shared_parameters())

    def fn():
        opt.zero_grad(set_to_none=True)
        z = model.encode(src[0].x)
        outs = model.decode(z)
        losses = [torch.nn.functional.cross_entropy(outs[t.name], src[0].y[t.name].long()) for t in tasks]
        mtl_backward(losses, features=z, shared_params=shared,
                     tasks_params=[list(model.task_parameters(t.name)) for t in tasks])
        jac_to_grad(shared, aggregator)
        opt.step()
    try:
        return time_steps(fn, steps)
    except Exception as e:  # an aggregator torchjd cannot run here
        print(f"torchjd {name} K={k}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu (the targets) or cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    registry = load_all()
    names = args.methods or registry.names()
    out: dict = {"setup": "MLP 784-512-512, K linear heads, batch 256, SGD, 1 thread; ratio = method / plain step",
                 "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                 "torch": torch.__version__, "results": {}}
    for k in args.ks:
        plain = polytask_step(k, None, args.steps)
        row: dict = {"plain_ms": round(plain * 1e3, 3)}
        for name in names:
            kind = registry.get(name).extra.get("kind")
            modes = ["params", "representation"] if kind == "aggregator" else ["params"]
            for mode in modes:
                key = name if kind != "aggregator" else f"{name}/{mode}"
                try:
                    cfg = MethodConfig(name=name, grad_mode=mode, params=PARAMS.get(name, lambda k: {})(k))
                    t = polytask_step(k, cfg, args.steps)
                    row[key] = round(t / plain, 3)
                except Exception as e:  # report, don't hide
                    row[key] = f"error: {type(e).__name__}: {e}"
            if kind == "aggregator":
                tj = torchjd_step(k, name, args.steps)
                if tj is not None:
                    row[f"{name}/torchjd"] = round(tj / plain, 3)
        out["results"][f"K={k}"] = row
    top = out["results"].get("K=10", {})
    ratios = {key: v for key, v in top.items() if isinstance(v, float) and key != "plain_ms"}
    out["targets_at_K10"] = {
        "representation_le_1.3_missed": {key: v for key, v in ratios.items()
                                         if key.endswith("/representation") and v > 1.3},
        "params_le_5_missed": {key: v for key, v in ratios.items() if key.endswith("/params") and v > 5},
        "slower_than_torchjd": {key: (v, ratios[key.replace("/params", "/torchjd")]) for key, v in ratios.items()
                                if key.endswith("/params") and key.replace("/params", "/torchjd") in ratios
                                and v >= ratios[key.replace("/params", "/torchjd")]},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
