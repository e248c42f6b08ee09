"""Time per training step of every method, as a ratio to the plain summed-loss step, measured interleaved.

Hard parameter sharing: MLP 784-512-512, K linear heads (10 classes), batch 256, SGD, one thread. Every variant
(the plain step, each method in each gradient mode, torchjd where installed) gets its own model and state, is
warmed up, and then all variants are timed in rounds within this one process: each round runs every variant for
``--steps-per-round`` steps, in an order rotated from round to round (A, B, C, then B, C, A, ...). A variant's
ratio is taken per round against the plain step of the same round, so a load change on a shared machine hits
both sides of a ratio; the JSON reports the median ratio and its spread (quartiles, min, max) over the rounds.

``--f32-gramian`` adds, for every Gramian aggregator, the same step with the Jacobian's Gramian multiplied in
the gradients' dtype (float32, the old training path): the cost of the float64 Gramian is the ratio of the two.
``--legacy-gramian`` adds the same step with the float64 Gramian as it was first built (the per-task feature
gradients stacked into K x B x D, a fresh float64 buffer per call, the update J^T w from the stack), so the
current path and the first float64 one are compared interleaved in one process (it differs from the first
path only in that the step no longer builds a label mask for fully labelled sources, ~0.1 ms at K = 10).
``--dense-rows`` adds, for every representation-mode variant, the same step with the heads' linear maps hidden from
the engine, so the K feature gradients are formed as K dense B x D rows (the path before the factored rows of
``polytask.jacobian.Factored``): the gain of the factored rows is the ratio of the two.
``--phases N`` times nothing: it runs the plain step and the representation-mode variants N steps each with a marker
between phases, for a load-independent count of instructions per step under callgrind
(``valgrind --tool=callgrind --dump-before=getppid python benchmarks/step_time.py --ks 10 --phases 3``).

Every burst is timed twice: wall clock (``time.perf_counter``) and this thread's CPU time (``time.thread_time``),
which leaves out the time the process waits for a core on a loaded machine (it still feels shared caches and memory
bandwidth). The JSON holds both ratios, the machine's load average before and after, and is written to
``--out`` (default ``benchmarks/results/step_time.json``).

Prints one JSON object. Usage: python benchmarks/step_time.py [--ks 2 5 10] [--methods a b] [--rounds 15]
[--steps-per-round 2] [--modes params representation] [--f32-gramian] [--legacy-gramian] [--dense-rows] [--out PATH]
[--phases N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

import polytask.engine.step as step_module
from polytask.config import MethodConfig
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method, train_step
from polytask.jacobian import dense
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
Step = Callable[[], None]


def problem(k: int, batch: int = 256):
    tasks = [Task(f"t{i}", "classification", 10) for i in range(k)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 784, generator=gen).to(DEVICE)
    y = {t.name: torch.randint(0, 10, (batch,), generator=gen).float().to(DEVICE) for t in tasks}
    return tasks, [TaskData(x, y)], [torch.arange(batch, device=DEVICE)]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def fresh_model(tasks: Sequence[Task]):
    torch.manual_seed(0)
    model = build_model(tasks, (784,), "mlp", {"hidden": [512, 512]}).to(DEVICE)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def gramian_in_block_dtype(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The old training path: each block's Gramian multiplied in the block's dtype, summed in float64."""
    blocks = [dense(b) for b in blocks]
    k = blocks[0].shape[0]
    out = torch.zeros(k, k, dtype=torch.float64, device=blocks[0].device)
    for b in blocks:
        m = b.reshape(k, -1)
        out += (m @ m.T).double()
    return out


def legacy_gramian(blocks: Sequence) -> torch.Tensor:
    """The first float64 training path: every block stacked (K x B x D in representation mode; the update J^T w
    then reads the stack), upcast by chunks into a float64 buffer allocated per call."""
    blocks = [dense(b) for b in blocks]
    k = blocks[0].shape[0]
    out = torch.zeros(k, k, dtype=torch.float64, device=blocks[0].device)
    step = max(256, 65536 // max(k, 1))
    work: torch.Tensor | None = None
    for b in blocks:
        m = b.reshape(k, -1)
        if m.device.type != "cpu" or m.dtype == torch.float64:
            m = m.to(torch.float64)
            out.addmm_(m, m.T)
            continue
        if work is None:
            work = torch.empty(k * step, dtype=torch.float64)
        for start in range(0, m.shape[1], step):
            c = m[:, start:start + step]
            w = work[:c.numel()].view(c.shape).copy_(c)
            out.addmm_(w, w.T)
    return out


@contextlib.contextmanager
def engine_gramian(fn: Callable | None) -> Iterator[None]:
    """Run the training step with ``fn`` as its Gramian (None: the engine's own)."""
    if fn is None:
        yield
        return
    saved = step_module.gramian
    step_module.gramian = fn
    try:
        yield
    finally:
        step_module.gramian = saved


def plain_step(k: int) -> Step:
    """The plain step: one backward of the summed loss."""
    tasks, src, rows = problem(k)
    model, opt = fresh_model(tasks)

    def fn() -> None:
        opt.zero_grad(set_to_none=True)
        task_losses(model, src, rows, tasks).sum().backward()
        opt.step()
    return fn


def polytask_step(k: int, cfg: MethodConfig, gram: Callable | None = None, dense_rows: bool = False) -> Step:
    """The engine's step; ``dense_rows``: with the linear heads hidden from it, so representation mode takes the
    per-task feature gradients as K dense rows (leaf copies of the feature) instead of in factors."""
    tasks, src, rows = problem(k)
    model, opt = fresh_model(tasks)
    if dense_rows:
        model.linear_head = lambda task: None
    method = build_method(cfg, [t.name for t in tasks])
    state = {"s": method.init(), "i": 0}

    def val_losses():  # CoBa watches validation losses; the benchmark reuses the training batch
        with torch.no_grad():
            return task_losses(model, src, rows, tasks)

    def fn() -> None:
        ctx = StepContext(state["i"], 0, None, val_losses, 100, torch.Generator().manual_seed(state["i"]))
        with engine_gramian(gram):
            _, _, state["s"] = train_step(model, method, state["s"], src, rows, tasks, opt, ctx, task_losses)
        state["i"] += 1
    return fn


def torchjd_step(k: int, name: str) -> Step | None:
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
    model, opt = fresh_model(tasks)
    try:
        aggregator = cls(**TORCHJD_ARGS.get(name, lambda k: {})(k))
    except Exception as e:  # e.g. an optional solver torchjd needs is not installed
        print(f"torchjd {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    shared = list(model.shared_parameters())

    def fn() -> None:
        opt.zero_grad(set_to_none=True)
        (z,) = model.features(src[0].x)
        outs = model.outputs([z])
        losses = [torch.nn.functional.cross_entropy(outs[t.name], src[0].y[t.name].long()) for t in tasks]
        mtl_backward(losses, features=z, shared_params=shared,
                     tasks_params=[list(model.task_parameters(t.name)) for t in tasks])
        jac_to_grad(shared, aggregator)
        opt.step()
    return fn


def burst(fn: Step, steps: int) -> tuple[float, float]:
    """Wall-clock and thread-CPU seconds per step over ``steps`` consecutive steps."""
    _sync()
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t) / steps, (time.thread_time() - c) / steps


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def summary(xs: list[float], digits: int = 3, ci: bool = False) -> dict:
    """Median, quartiles and range of ``xs``; ``ci``: also ``median_ci95``, a 95% bootstrap interval of the median
    (2,000 resamples, seeded: the same ``xs`` give the same interval), for a ratio read against a target."""
    out = {"median": round(statistics.median(xs), digits), "q25": round(quantile(xs, 0.25), digits),
           "q75": round(quantile(xs, 0.75), digits), "min": round(min(xs), digits), "max": round(max(xs), digits)}
    if ci:
        rng = random.Random(0)
        medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
        out["median_ci95"] = [round(medians[49], digits), round(medians[1950], digits)]
    return out


def interleaved(variants: dict[str, Step], rounds: int, steps: int, warmup: int
                ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, str]]:
    """Per-round (wall, thread CPU) seconds per step of every variant, the order rotated each round, and the errors
    of the variants that failed in warm-up (dropped from the rounds)."""
    errors: dict[str, str] = {}
    for name, fn in list(variants.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:  # report, don't hide
            errors[name] = f"error: {type(e).__name__}: {e}"
            del variants[name]
    names = list(variants)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(burst(variants[name], steps))
    return times, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (each variant once per round)")
    ap.add_argument("--steps-per-round", type=int, default=2, help="consecutive steps timed per variant and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--f32-gramian", action="store_true",
                    help="also time each Gramian aggregator with a float32 Gramian (the old path), for its cost")
    ap.add_argument("--legacy-gramian", action="store_true",
                    help="also time each Gramian aggregator with the first float64 path (stacked blocks, fresh buffer)")
    ap.add_argument("--dense-rows", action="store_true",
                    help="also time each representation-mode method with the K feature-gradient rows formed densely "
                    "(the path before the linear heads' factored rows)")
    ap.add_argument("--modes", nargs="+", default=["params", "representation"],
                    help="gradient modes of the aggregators to time")
    ap.add_argument("--device", default="cpu", help="cpu (the targets) or cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.json"),
                    help="where to write the JSON (also printed)")
    ap.add_argument("--phases", type=int, default=0,
                    help="instead of timing: run the plain step and the representation-mode variants of the first "
                         "method at the largest K for this many steps each, calling os.getppid() between phases "
                         "(a marker for `valgrind --tool=callgrind --dump-before=getppid`: one dump per phase)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    if args.phases:
        phases(max(args.ks), (args.methods or ["upgrad"])[0], args.phases)
        return
    registry = load_all()
    names = args.methods or registry.names()
    out: dict = {"setup": "MLP 784-512-512, K linear heads, batch 256, SGD, 1 thread; ratio = method / plain step, "
                          f"paired per round; {args.rounds} interleaved rounds of {args.steps_per_round} steps per "
                          "variant, order rotated each round; median and spread (quartiles, min, max) over rounds; "
                          "'results': wall-clock ratios, 'results_cpu': thread-CPU-time ratios",
                 "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                 "torch": torch.__version__, "gramian": "float64", "load_before": os.getloadavg(),
                 "cpus": os.cpu_count(), "results": {}, "results_cpu": {}}
    for k in args.ks:
        variants: dict[str, Step] = {"plain": plain_step(k)}
        for name in names:
            entry = registry.get(name)
            kind = entry.extra.get("kind")
            modes = list(args.modes) if kind == "aggregator" else ["params"]
            for mode in modes:
                key = name if kind != "aggregator" else f"{name}/{mode}"
                try:
                    cfg = MethodConfig(name=name, grad_mode=mode, params=PARAMS.get(name, lambda k: {})(k))
                    variants[key] = polytask_step(k, cfg)
                    if args.f32_gramian and kind == "aggregator" and takes_gramian(cfg, k):
                        variants[f"{key}+f32_gramian"] = polytask_step(k, cfg, gramian_in_block_dtype)
                    if args.legacy_gramian and kind == "aggregator" and takes_gramian(cfg, k):
                        variants[f"{key}+legacy_gramian"] = polytask_step(k, cfg, legacy_gramian)
                    if args.dense_rows and mode == "representation":
                        variants[f"{key}+dense_rows"] = polytask_step(k, cfg, dense_rows=True)
                except Exception as e:  # report, don't hide
                    variants[key] = _failing(e)
            if kind == "aggregator":
                tj = torchjd_step(k, name)
                if tj is not None:
                    variants[f"{name}/torchjd"] = tj
        times, errors = interleaved(variants, args.rounds, args.steps_per_round, args.warmup)
        if "plain" in errors:
            raise SystemExit(f"the plain step failed: {errors['plain']}")
        plain = times.pop("plain")
        for which, col in (("results", 0), ("results_cpu", 1)):
            row: dict = {"plain_ms": summary([t[col] * 1e3 for t in plain])}
            row |= {key: summary([t[col] / p[col] for t, p in zip(ts, plain, strict=True)])
                    for key, ts in times.items()}
            row |= errors
            out[which][f"K={k}"] = row
    out["load_after"] = os.getloadavg()
    top = out["results"].get(f"K={max(args.ks)}", {})
    ratios = {key: v["median"] for key, v in top.items() if isinstance(v, dict) and key != "plain_ms"}
    out["targets_at_largest_K"] = {
        "K": max(args.ks),
        "representation_le_1.3_missed": {key: v for key, v in ratios.items()
                                         if key.endswith("/representation") and v > 1.3},
        "params_le_5_missed": {key: v for key, v in ratios.items() if key.endswith("/params") and v > 5},
        "slower_than_torchjd": {key: (v, ratios[key.replace("/params", "/torchjd")]) for key, v in ratios.items()
                                if key.endswith("/params") and key.replace("/params", "/torchjd") in ratios
                                and v >= ratios[key.replace("/params", "/torchjd")]},
    }
    text = json.dumps(out, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


def phases(k: int, name: str, steps: int) -> None:
    """Instruction counts per step without timing (load-independent): the plain step, then ``name`` in
    representation mode with the current, the first float64 (``legacy_gramian``) and the float32 Gramian, then the
    plain step again, ``steps`` steps each after two warm-up steps, ``os.getppid()`` before every phase. Under
    ``valgrind --tool=callgrind --dump-before=getppid`` dump i+1 holds phase i's instructions."""
    cfg = MethodConfig(name=name, grad_mode="representation")
    variants = {"plain": plain_step(k), "current": polytask_step(k, cfg), "legacy_gramian": polytask_step(
        k, cfg, legacy_gramian), "f32_gramian": polytask_step(k, cfg, gramian_in_block_dtype)}
    for fn in variants.values():
        for _ in range(2):
            fn()
    order = [*variants, "plain"]
    print(json.dumps({"phases": order, "steps": steps, "K": k, "method": name}), flush=True)
    os.getppid()
    for key in order:
        for _ in range(steps):
            variants[key]()
        os.getppid()


def takes_gramian(cfg: MethodConfig, k: int) -> bool:
    """Whether the aggregator reads the Gramian (rather than the Jacobian itself)."""
    return build_method(cfg, [f"t{i}" for i in range(k)]).impl.input == "gramian"


def _failing(e: Exception) -> Step:
    """A variant that could not be built: raises its error when run, so it is reported with the others."""
    def fn() -> None:
        raise e
    return fn


if __name__ == "__main__":
    main()
