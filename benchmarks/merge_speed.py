"""Speed and memory of streaming merges against the read-once floor, interleaved, as JSON.

Builds a Llama-layout base and N perturbed variants as HF directories (default: 12 layers, hidden 768, MLP 2048,
vocabulary 32000 = 134M parameters, bfloat16), then measures, round after round, every variant in turn (the
order rotates each round, so a slow spell of a shared machine hits every variant alike):

- the read-once floor: every input byte read once with a cold page cache (caches dropped with
  /proc/sys/vm/drop_caches; where that is not allowed, input bytes / the O_DIRECT read speed of the device);
- polytask's merge of each method in a fresh subprocess, cold cache: wall time after imports, the CPU seconds
  of the merge (all threads), and peak resident memory (ru_maxrss of that child, from wait4);
- optionally mergekit's ``mergekit-yaml`` on the same job (``--mergekit PATH``): wall time less its import time.

Each ratio (merge time / floor time) is taken within one round and reported as the median with its min and max
over rounds; times likewise. The 1-minute load average at the start of each round is recorded: on a shared
machine other processes take CPU time from the merge, but not from the (disk-bound) floor. Memory target: peak
RSS <= largest tensor x (N + 2) + the RSS of a process that only imports polytask and torch + 2 x the prefetch
budget (read-ahead, and idle buffers kept for reuse).

    python benchmarks/merge_speed.py [--dir /tmp/merge-speed] [--n 8] [--rounds 3] [--methods ties dare_ties]
                                     [--dtype bfloat16] [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--keep]
                                     [--baseline-src /tmp/before/src] [--save FILE]

``--baseline-src`` interleaves another version's merges (its ``src/`` folder, e.g. from
``git archive REV src | tar -x -C /tmp/before``) as ``baseline:<method>`` in every round, and reports the
current/baseline ratio per round (median and spread). The JSON is written to benchmarks/results/ as well.

``--kernels`` measures the merge kernels alone instead: the CPU nanoseconds per model entry of each method on a
few tensors of the family held in memory (the input embedding and layer 0's up and query projections by
default, ``--tensors``), in this process with ``--threads`` worker threads (default 1: the cost of the work,
not of a busy machine), round after round. With ``--baseline-ops FILE`` (another version of
``polytask/merging/ops.py``, e.g. ``git show REV:src/polytask/merging/ops.py > /tmp/ops_before.py``) each round
times both implementations in alternating order and checks that they give the same bytes:

    python benchmarks/merge_speed.py --dir /tmp/ms --kernels --baseline-ops /tmp/ops_before.py --rounds 9 --keep
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()

CHILD = "child"
BUF = 16 * 2**20
PARAMS = {"ties": {"density": 0.2}, "dare_ties": {"drop_rate": 0.9, "density": 1.0}, "dare": {"drop_rate": 0.9},
          "breadcrumbs": {"density": 0.8, "gamma": 0.01}, "task_arithmetic": {}, "average": {}}
MERGEKIT = {"ties": ("ties", {"density": 0.2}), "dare_ties": ("dare_ties", {"density": 0.1}),
            "dare": ("dare_linear", {"density": 0.1}), "breadcrumbs": ("breadcrumbs", {"density": 0.8, "gamma": 0.01}),
            "task_arithmetic": ("task_arithmetic", {}), "average": ("linear", {})}


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def weight_files(dirs: list[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def read_all(files: list[Path]) -> tuple[int, float]:
    """Read every byte of ``files`` once with large reads; (bytes, seconds)."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - t


def direct_read_speed(path: Path) -> float | None:
    """Bytes per second of O_DIRECT reads of ``path`` (bypasses the page cache), or None if unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return None
    buf = mmap.mmap(-1, BUF)
    total = 0
    t = time.perf_counter()
    try:
        while n := os.readv(fd, [buf]):
            total += n
            if n < BUF:
                break
    except OSError:
        return None
    finally:
        os.close(fd)
    return total / (time.perf_counter() - t)


def rss_of(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str, float, int]:
    """Run ``cmd`` and return (rc, stdout, stderr, wall s, peak RSS bytes) using wait4 on that one child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read(), err.read(), wall, usage.ru_maxrss * 1024


def child(argv: list[str]) -> None:
    """Run one merge in this process and print its timings (imports are timed separately)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--base")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--method")
    ap.add_argument("--out")
    ap.add_argument("--prefetch", default="512MiB")
    ap.add_argument("--import-only", action="store_true")
    a = ap.parse_args(argv)
    from polytask.merging import merge_checkpoints

    t_imported = time.perf_counter()
    if a.import_only:
        print(json.dumps({"import_s": t_imported - T_START}))
        return
    cpu = time.process_time()
    before = resource.getrusage(resource.RUSAGE_SELF)
    s = merge_checkpoints(a.base, a.models, a.method, a.out, PARAMS[a.method],
                          options={"prefetch": a.prefetch}, copy_files=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"import_s": t_imported - T_START, "merge_s": time.perf_counter() - t_imported,
                      "merge_cpu_s": time.process_time() - cpu, "merge_sys_s": after.ru_stime - before.ru_stime,
                      "input_bytes": s["input_bytes"], "output_bytes": s["output_bytes"]}))


def load_ops(path: str) -> object:
    """Another version of ``polytask.merging.ops`` loaded from ``path`` as its own module."""
    spec = importlib.util.spec_from_file_location("polytask_baseline_ops", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-ops: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def kernels(args: argparse.Namespace, base: Path, variants: list[Path], params_total: int) -> dict[str, object]:
    """CPU ns per model entry of each method's merge of ``args.tensors`` held in memory (see the module doc)."""
    import torch

    from polytask.merging import methods, open_checkpoint
    from polytask.merging import ops as current

    torch.set_num_threads(1)
    impls = {"current": current}
    if args.baseline_ops:
        impls["baseline"] = load_ops(args.baseline_ops)
    n = max(args.n)
    ckpts = [open_checkpoint(p) for p in [base, *variants[:n]]]
    data = {name: [c.load(name) for c in ckpts] for name in args.tensors}
    for c in ckpts:
        c.close()
    entries = sum(data[name][0].numel() for name in args.tensors) * n

    bases = {name: torch.empty(data[name][0].shape) for name in args.tensors}  # the merge writes into the base

    def once(module: object, method: str) -> tuple[float, list[bytes]]:
        methods.ops = module  # type: ignore[assignment]  # the methods call ops.<function> at call time
        entry, p, mp, w = methods.data_free_setup(method, PARAMS[method], None, None, n)
        for name in args.tensors:
            bases[name].copy_(data[name][0])
        outs, seconds = [], 0.0
        with module.kernel_threads(args.threads):  # type: ignore[attr-defined]
            for name in args.tensors:
                inp = methods.MergeInputs(name, bases[name], data[name][1:], w, p, mp, 0, None, consume=True,
                                          dtype=torch.float32)
                cpu = time.process_time()
                out = entry.build(inp)
                seconds += time.process_time() - cpu
                outs.append(out.numpy().tobytes())
        return seconds / entries * 1e9, outs

    result: dict[str, object] = {}
    try:
        for method in args.methods:
            times: dict[str, list[float]] = {k: [] for k in impls}
            loads = []
            for r in range(args.rounds):
                loads.append(os.getloadavg()[0])
                order = list(impls) if r % 2 == 0 else list(impls)[::-1]
                got = {}
                for label in order:
                    ns, got[label] = once(impls[label], method)
                    times[label].append(ns)
                if len(got) > 1 and got["current"] != got["baseline"]:
                    raise SystemExit(f"{method}: the current and baseline ops give different bytes")
            row: dict[str, object] = {k: spread(v) for k, v in times.items()}
            if "baseline" in times:
                ratio = statistics.median(times["current"]) / statistics.median(times["baseline"])
                row["current_over_baseline"] = ratio
                row["same_bytes"] = True
            row["load_average_1min"] = loads
            result[method] = row
            print(json.dumps({"method": method, **row}), file=sys.stderr, flush=True)
    finally:
        methods.ops = current
    return {"benchmark": "merge_speed --kernels", "tensors": args.tensors, "models": n, "entries": entries,
            "threads": args.threads, "model_parameters": params_total, "params": {m: PARAMS[m] for m in args.methods},
            "cpu_ns_per_model_entry": result, "baseline_ops": args.baseline_ops}


def save(result: dict[str, object], path: str | None, default: str) -> None:
    """Write ``result`` as JSON to ``path`` (None: benchmarks/results/``default``; empty: nowhere)."""
    if path == "":
        return
    out = Path(path) if path else Path(__file__).resolve().parent / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def _uptime() -> str:
    """The machine's ``uptime`` line (its load: the benchmark shares the CPUs with whatever else runs)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max (the rounds' spread)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/merge-speed")
    ap.add_argument("--n", type=int, nargs="*", default=[8])
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every variant (medians and spread over them)")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml to time on the same jobs")
    ap.add_argument("--prefetch", default="512MiB")
    ap.add_argument("--keep", action="store_true", help="keep the built models for another run")
    ap.add_argument("--kernels", action="store_true", help="time the merge kernels in memory (see the module doc)")
    ap.add_argument("--baseline-ops", default=None, help="with --kernels: an ops.py to interleave with the current")
    ap.add_argument("--baseline-src", default=None, help="a src/ folder of another polytask version (e.g. from git "
                    "archive) whose merges are interleaved with the current ones as baseline:<method>")
    ap.add_argument("--save", default=None, help="where the JSON is written too (default benchmarks/results/"
                    "merge_speed.json, or merge_speed_kernels.json with --kernels; '' for nowhere)")
    ap.add_argument("--threads", type=int, default=1, help="with --kernels: merge worker threads")
    ap.add_argument("--tensors", nargs="*", default=["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                                                      "model.layers.0.self_attn.q_proj.weight"])
    args = ap.parse_args()

    import torch

    from polytask.merging import open_checkpoint
    from polytask.merging.synthetic import make_model_family
    from polytask.merging.writer import parse_size

    root = Path(args.dir)
    dtype = getattr(torch, args.dtype)
    n_max = max(args.n)
    want = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
            "n": n_max, "dtype": args.dtype}
    stamp = root / "family.json"
    t = time.perf_counter()
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_model_family(root / "models", n_max, layers=args.layers, hidden=args.hidden,
                          intermediate=args.intermediate, vocab=args.vocab, dtype=dtype)
        stamp.write_text(json.dumps(want))
    build_s = time.perf_counter() - t
    base = root / "models" / "base"
    variants = [root / "models" / f"ft{k}" for k in range(n_max)]
    with open_checkpoint(base) as c:
        sizes = {n: c.info(n).nbytes for n in c.names()}
        params = sum(c.info(n).numel for n in c.names())
    largest_compute = max(sizes.values()) * 4 // torch.empty((), dtype=dtype).element_size()
    if args.kernels:
        result = {**kernels(args, base, variants, params), "uptime": _uptime()}
        print(json.dumps(result, indent=2))
        save(result, args.save, "merge_speed_kernels.json")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return

    can_drop = drop_caches()
    speed = None if can_drop else direct_read_speed(weight_files([base])[0])
    rc, out, _, _, import_rss = rss_of([sys.executable, __file__, CHILD, "--import-only"])
    import_s = json.loads(out)["import_s"] if rc == 0 else None
    mk_import_s = None
    if args.mergekit:
        py = Path(args.mergekit).parent / "python"
        rc, out, _, _, _ = rss_of([str(py), "-c", "import time; t=time.perf_counter(); "
                                   "import mergekit.scripts.run_yaml; print(time.perf_counter()-t)"])
        mk_import_s = float(out) if rc == 0 else None

    rows = []
    for n in args.n:
        dirs = [base, *variants[:n]]
        files = weight_files(dirs)
        nbytes = sum(f.stat().st_size for f in files)
        labels = ["floor"] + [f"polytask:{m}" for m in args.methods] + \
            ([f"baseline:{m}" for m in args.methods] if args.baseline_src else []) + \
            ([f"mergekit:{m}" for m in args.methods if m in MERGEKIT] if args.mergekit else [])
        times: dict[str, list[float]] = {k: [] for k in labels}
        cpus: dict[str, list[float]] = {k: [] for k in labels}
        syss: dict[str, list[float]] = {k: [] for k in labels}
        loads: list[float] = []
        rss: dict[str, list[int]] = {k: [] for k in labels}
        ratios: dict[str, list[float]] = {k: [] for k in labels[1:]}
        errors: dict[str, str] = {}
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            got: dict[str, float] = {}
            loads.append(os.getloadavg()[0])
            for label in order:
                if can_drop:
                    drop_caches()
                if label == "floor":
                    if can_drop:
                        got[label] = read_all(files)[1]
                    else:
                        got[label] = nbytes / speed if speed else float("nan")
                    continue
                tool, method = label.split(":")
                out_dir = root / f"out-{tool}-{method}-{n}"
                shutil.rmtree(out_dir, ignore_errors=True)
                if tool in ("polytask", "baseline"):
                    cmd = [sys.executable, __file__, CHILD, "--base", str(base), "--models", *map(str, variants[:n]),
                           "--method", method, "--out", str(out_dir), "--prefetch", args.prefetch]
                    env = {**os.environ, "PYTHONPATH": str(Path(args.baseline_src).resolve())} \
                        if tool == "baseline" else None
                    rc, out, err, _, peak = rss_of(cmd, env)
                    seconds = json.loads(out)["merge_s"] if rc == 0 else None
                    if rc == 0:
                        cpus[label].append(json.loads(out)["merge_cpu_s"])
                        syss[label].append(json.loads(out)["merge_sys_s"])
                else:
                    mk_method, mk_params = MERGEKIT[method]
                    cfg = {"merge_method": mk_method, "dtype": args.dtype,
                           "models": [{"model": str(v), "parameters": {"weight": 1.0, **mk_params}}
                                      for v in variants[:n]]}
                    if mk_method != "linear":
                        cfg["base_model"] = str(base)
                    cfg_path = root / f"mk-{method}-{n}.yml"
                    cfg_path.write_text(json.dumps(cfg))
                    rc, out, err, wall, peak = rss_of([args.mergekit, str(cfg_path), str(out_dir),
                                                       "--no-copy-tokenizer", "--quiet", "--no-write-model-card",
                                                       "--out-shard-size", "5B"])
                    seconds = wall - (mk_import_s or 0.0) if rc == 0 else None
                shutil.rmtree(out_dir, ignore_errors=True)
                if seconds is None:
                    errors[label] = err[-1500:]
                    continue
                got[label] = seconds
                rss[label].append(peak)
            for label, seconds in got.items():
                times[label].append(seconds)
                if label != "floor" and "floor" in got:
                    ratios[label].append(seconds / got["floor"])
            print(json.dumps({"n": n, "round": r, "seconds": got}), file=sys.stderr, flush=True)
        row: dict[str, object] = {"n": n, "input_bytes": nbytes, "rounds": args.rounds, "load_average_1min": loads,
                                  "floor_kind": "cold page cache (drop_caches)" if can_drop else
                                  "input bytes / O_DIRECT read speed", "floor_s": spread(times["floor"])}
        bound = largest_compute * (n + 2) + import_rss + 2 * parse_size(args.prefetch)
        for label in labels[1:]:
            entry: dict[str, object] = {"seconds": spread(times[label]),
                                        "ratio_to_cold_floor": spread(ratios[label])}
            if cpus[label]:  # CPU seconds of the merge (all its threads): less sensitive to a busy machine
                entry["cpu_seconds"] = spread(cpus[label])
                entry["cpu_ns_per_model_entry"] = statistics.median(cpus[label]) / (params * n) * 1e9
                entry["sys_cpu_seconds"] = spread(syss[label])  # the kernel's share: reads, page faults, writes
            if rss[label]:
                entry["peak_rss_bytes"] = max(rss[label])
                if label.startswith(("polytask", "baseline")):
                    entry["memory_bound_bytes"] = bound
                    entry["peak_over_bound"] = max(rss[label]) / bound
            if label in errors:
                entry["error"] = errors[label]
            row[label] = entry
        for method in args.methods:
            mk, pt = times.get(f"mergekit:{method}"), times.get(f"polytask:{method}")
            if mk and pt:
                row[f"speedup_vs_mergekit:{method}"] = statistics.median(mk) / statistics.median(pt)
            bl = times.get(f"baseline:{method}")
            if bl and pt:  # per round (both ran in it), then the median and spread over rounds
                per_round = [a / b for a, b in zip(pt, bl, strict=False)]
                row[f"current_over_baseline:{method}"] = spread(per_round)
        rows.append(row)
    result = {
        "benchmark": "merge_speed",
        "model": {"layout": "llama", **{k: want[k] for k in ("layers", "hidden", "intermediate", "vocab")},
                  "parameters": params, "dtype": args.dtype, "largest_tensor_bytes": max(sizes.values())},
        "cpus": os.cpu_count(), "drop_caches": can_drop, "odirect_bytes_per_s": speed,
        "polytask_import_s": import_s, "polytask_import_rss": import_rss, "mergekit_import_s": mk_import_s,
        "prefetch": args.prefetch, "params": {m: PARAMS[m] for m in args.methods}, "build_s": build_s,
        "interleaved": True, "baseline_src": args.baseline_src, "uptime": _uptime(), "rows": rows,
    }
    print(json.dumps(result, indent=2))
    save(result, args.save, "merge_speed.json")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
