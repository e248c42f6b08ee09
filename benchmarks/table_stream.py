"""The streamed ``table`` suite (``stream: true``): its step time against the in-memory path, and its peak memory
on a table larger than the memory it is given.

(a) Speed. A Parquet table of ``--rows`` rows × ``--cols`` columns (``--cols`` - 2 float64 features, a 5-class and a
regression target; row groups of ``--row-group`` rows) is built twice, in memory and streamed
(``shuffle_rows``: ``--shuffle-rows``). Three variants train the same MLP (``--hidden``, batch ``--batch-size``,
Adam, the ``equal`` method through the engine's ``train_step``, one torch thread): ``memory`` (``TensorBatches``),
``stream`` (``StreamBatches``, reading the next window in a background thread) and ``stream_sync`` (no read-ahead).
Each round trains one whole epoch of every variant, the order rotated from round to round; an epoch's time
includes every read it waits for (read-ahead never crosses an epoch, so no variant reads during another's turn).
The ratio is taken per round against ``memory`` of the same round; the JSON gives medians and spread, the process's
CPU time per step (the work done, read-ahead thread included, whatever else the machine runs), and the load average
before and after: the read-ahead hides reading only where a core is free for it, so on a machine busy with
other work the ``stream`` ratio moves towards ``stream_sync``.

(b) Memory. A table of ``--big-rows`` rows × ``--cols`` columns is written under ``--dir`` (default: the temp dir,
never the repository) a row group at a time, then a child process builds the streamed suite and trains one epoch of
the real loop (``engine.loop.train_job``: every training row once, validation and test evaluated, checkpoint
written) with batch ``--big-batch-size``, under a limit of ``--limit-gib`` GiB on its data segment (``RLIMIT_DATA``,
``ulimit -d``, ``prlimit --data``: the heap and private writable mappings, i.e. every array it could allocate; an
allocation past it fails with MemoryError). Not ``RLIMIT_AS`` (``ulimit -v``): that counts address space, of which
importing torch, pyarrow and pandas alone reserves about 1 GiB that is never touched. The child uses Arrow's system
allocator (``ARROW_DEFAULT_MEMORY_POOL=system``): mimalloc, Arrow's default, reserves about 1 GiB of writable
address space up front, which the data limit counts though it is never used. It reports its peak resident memory
(``VmHWM``). A second child does the same with the file read in memory (``stream: false``) and no limit, for its peak
resident memory.

Prints one JSON object. Usage: python benchmarks/table_stream.py [--rows 200000] [--rounds 7] [--big-rows 5000000]
[--limit-gib 1.0] [--skip-memory] [--skip-speed] [--skip-contrast] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_table(path: Path, rows: int, cols: int, row_group: int, seed: int = 0) -> None:
    """A Parquet table written one row group at a time (never whole in memory): ``cols`` - 2 float64 features, a
    5-class target ``cls`` and a regression target ``reg``, both functions of the features plus noise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    d = cols - 2
    w = rng.normal(size=(d, 2)) / np.sqrt(d)
    names = [f"f{i}" for i in range(d)]
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, pa.schema([(n, pa.float64()) for n in names] + [("cls", pa.int64()),
                                                                               ("reg", pa.float64())])) as out:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            x = rng.normal(size=(n, d))
            z = x @ w + 0.3 * rng.normal(size=(n, 2))
            cls = np.digitize(z[:, 0], [-0.8, -0.25, 0.25, 0.8])
            columns = [pa.array(x[:, j]) for j in range(d)] + [pa.array(cls), pa.array(1000 + 200 * z[:, 1])]
            out.write_table(pa.Table.from_arrays(columns, names=[*names, "cls", "reg"]), row_group_size=row_group)
    os.replace(tmp, path)


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def spread(xs: list[float], digits: int = 4) -> dict[str, float]:
    return {"median": round(statistics.median(xs), digits), "q25": round(quantile(xs, 0.25), digits),
            "q75": round(quantile(xs, 0.75), digits), "min": round(min(xs), digits), "max": round(max(xs), digits)}


def params(path: Path, stream: bool, shuffle_rows: int) -> dict:
    return {"path": str(path), "targets": ["cls", "reg"], "stream": stream, "shuffle_rows": shuffle_rows}


# ---------------------------------------------------------------- (a) speed


def speed(args: argparse.Namespace, root: Path) -> dict:
    import torch

    import polytask.tasks.suites  # noqa: F401  (registers the suites)
    from polytask.config import MethodConfig
    from polytask.engine.data import StreamBatches, TensorBatches
    from polytask.engine.loop import task_losses
    from polytask.engine.step import build_method, train_step
    from polytask.models import build_model
    from polytask.tasks.registry import build_suite
    from polytask.weighting import StepContext

    torch.set_num_threads(1)
    path = root / f"speed_{args.rows}x{args.cols}.parquet"
    if not path.exists():
        write_table(path, args.rows, args.cols, args.row_group)
    memory = build_suite("table", params(path, False, args.shuffle_rows), 0)
    streamed = build_suite("table", params(path, True, args.shuffle_rows), 0)
    sources = {"memory": TensorBatches(memory.splits, args.batch_size),
               "stream": StreamBatches(streamed.splits, args.batch_size),
               "stream_sync": StreamBatches(streamed.splits, args.batch_size, read_ahead=False)}
    tasks = list(memory.tasks)
    names = [t.name for t in tasks]

    def variant(source):
        torch.manual_seed(0)
        model = build_model(tasks, memory.input_shape, "mlp", {"hidden": args.hidden})
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        method = build_method(MethodConfig(name="equal"), names)
        state = {"s": method.init(), "i": 0}
        steps = source.steps_per_epoch()

        def epoch(e: int) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            batches = source.epoch(0, e)
            for i in range(steps):
                b = batches[i]
                ctx = StepContext(state["i"], e, None, None, steps, torch.Generator().manual_seed(state["i"]))
                _, _, state["s"] = train_step(model, method, state["s"], b.sources, b.rows, tasks, opt, ctx,
                                              task_losses)
                state["i"] += 1
            return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
        return epoch, steps

    variants = {name: variant(src) for name, src in sources.items()}
    for fn, _ in variants.values():  # warm-up: one epoch each (page cache, allocator, first reads)
        fn(0)
    order = list(variants)
    times: dict[str, list[float]] = {n: [] for n in order}
    cpu: dict[str, list[float]] = {n: [] for n in order}
    for r in range(args.rounds):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            wall, used = variants[name][0](r + 1)
            times[name].append(wall)
            cpu[name].append(used)
    ratio = {n: spread([a / b for a, b in zip(times[n], times["memory"], strict=True)], 3)
             for n in order if n != "memory"}
    return {"table": {"rows": args.rows, "cols": args.cols, "row_group": args.row_group,
                      "shuffle_rows": args.shuffle_rows, "file_mib": round(path.stat().st_size / 2**20, 1)},
            "model": {"backbone": "mlp", "hidden": args.hidden, "batch_size": args.batch_size, "method": "equal",
                      "optimizer": "adam", "threads": 1},
            "steps_per_epoch": variants["memory"][1], "rounds": args.rounds,
            "ms_per_step": {n: spread([1000 * t for t in ts], 4) for n, ts in times.items()},
            "ratio_vs_memory": ratio,
            # CPU seconds of the whole process (the read-ahead thread included) per step: the work, whatever the load
            "cpu_ms_per_step": {n: spread([1000 * t for t in ts], 4) for n, ts in cpu.items()},
            "cpu_ratio_vs_memory": {n: spread([a / b for a, b in zip(cpu[n], cpu["memory"], strict=True)], 3)
                                    for n in order if n != "memory"}}


# ---------------------------------------------------------------- (b) memory, in a child process


def status(field: str) -> float:
    """A /proc/self/status field in MiB (VmHWM: peak resident memory; VmPeak: peak virtual memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Build the suite of ``args.path`` (streamed or not) and train one epoch of the real loop; print JSON."""
    out: dict = {"stream": args.child == "stream"}
    try:
        import torch

        import polytask.tasks.suites  # noqa: F401
        from polytask.config import MethodConfig
        from polytask.engine.data import batch_source
        from polytask.engine.loop import train_job
        from polytask.engine.optim import optimizer
        from polytask.engine.spec import CheckpointPolicy, TrainSpec
        from polytask.engine.step import build_method
        from polytask.models import build_model
        from polytask.tasks.registry import build_suite

        torch.set_num_threads(1)
        out["after_imports_rss_mib"] = status("VmHWM")
        t0 = time.perf_counter()
        suite = build_suite("table", params(Path(args.path), out["stream"], args.shuffle_rows), 0)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        out["after_build_rss_mib"] = status("VmHWM")
        out["rows"] = {s: len(suite.splits[s][0]) for s in ("train", "val", "test")}
        tasks = list(suite.tasks)
        data = batch_source(suite.splits, args.big_batch_size)
        out["batch_source"] = type(data).__name__
        with tempfile.TemporaryDirectory() as jobs:
            spec = TrainSpec(
                name="bench", tasks=tasks,
                model=lambda: build_model(tasks, suite.input_shape, "mlp", {"hidden": args.hidden}),
                optimizer=optimizer("adam", {"lr": 1e-3}, "bench"), scheduler=None,
                method=build_method(MethodConfig(name="equal"), [t.name for t in tasks]), data=data, epochs=1,
                checkpoint=CheckpointPolicy(Path(jobs)), seed=0, device=torch.device("cpu"))
            t0 = time.perf_counter()
            result = train_job(spec)
        out["train_and_eval_s"] = round(time.perf_counter() - t0, 1)
        out["steps"] = result["steps"]
        out["test"] = result["test"]
        out["ok"] = True
    except BaseException as e:  # MemoryError, or whatever the limit makes fail: report it
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["peak_rss_mib"] = status("VmHWM")
    out["peak_virtual_mib"] = status("VmPeak")
    out["data_mib"] = status("VmData")
    out["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


def under_limit(args: argparse.Namespace, path: Path, mode: str, gib: float | None) -> dict:
    """The child's JSON, run under an address-space limit of ``gib`` GiB (None: no limit)."""

    def cap() -> None:
        if gib is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (int(gib * 2**30), int(gib * 2**30)))

    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--hidden", *map(str, args.hidden),
           "--big-batch-size", str(args.big_batch_size), "--shuffle-rows", str(args.shuffle_rows)]
    env = dict(os.environ, POLYTASK_CACHE_DIR=str(path.parent / "cache"), OMP_NUM_THREADS="1",
               ARROW_DEFAULT_MEMORY_POOL="system")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    got = json.loads(lines[-1]) if lines else {"ok": False, "error": proc.stderr[-500:]}
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), **got}


def memory(args: argparse.Namespace, root: Path) -> dict:
    path = root / f"big_{args.big_rows}x{args.cols}.parquet"
    t0 = time.perf_counter()
    if not path.exists():
        write_table(path, args.big_rows, args.cols, args.row_group)
    written = round(time.perf_counter() - t0, 1)
    out = {"table": {"rows": args.big_rows, "cols": args.cols, "row_group": args.row_group,
                     "file_mib": round(path.stat().st_size / 2**20, 1), "path": str(path), "write_s": written},
           "limit": {"kind": "RLIMIT_DATA (ulimit -d: heap and private writable memory)", "gib": args.limit_gib,
                     "arrow_memory_pool": "system"},
           "batch_size": args.big_batch_size,
           "stream": under_limit(args, path, "stream", args.limit_gib)}
    if not args.skip_contrast:
        out["in_memory_no_limit"] = under_limit(args, path, "memory", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cols", type=int, default=50)
    ap.add_argument("--row-group", type=int, default=16384)
    ap.add_argument("--shuffle-rows", type=int, default=65536)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--big-rows", type=int, default=5_000_000)
    ap.add_argument("--big-batch-size", type=int, default=512)
    ap.add_argument("--limit-gib", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where the tables go (default: a folder in the temp dir)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-contrast", action="store_true", help="do not also read the big table in memory")
    ap.add_argument("--keep", action="store_true", help="keep the generated tables")
    ap.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    root = Path(args.dir or Path(tempfile.gettempdir()) / "polytask_table_stream")
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"cpus": os.cpu_count(), "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    try:
        if not args.skip_speed:
            out["speed"] = speed(args, root)
        if not args.skip_memory:
            out["memory"] = memory(args, root)
    finally:
        if not args.keep:
            for p in sorted(root.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
    out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]  # a shared machine's other work shows here
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
