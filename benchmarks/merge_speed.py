"""Speed and memory of streaming merges on a ~110M-parameter transformer, as JSON.

Builds a Llama-layout base (12 layers, hidden 768, MLP 2048, vocabulary 16000: 110M parameters, float32) and
8 perturbed variants as HF directories, then for N in {2, 4, 8} and each method (task arithmetic, TIES):

- the read-once floor: every input byte read once from disk with a cold page cache (caches dropped with
  /proc/sys/vm/drop_caches; where that is not allowed, input bytes / the O_DIRECT read speed of the device),
  and the same read with a warm cache;
- polytask's merge in a fresh subprocess, cold and warm cache: wall time after imports, and peak resident
  memory (ru_maxrss of that child, from wait4);
- mergekit's ``mergekit-yaml`` on the same job in the same run (when installed): wall time (whole process, and
  less its measured import time) and peak resident memory.

Memory target: peak RSS <= largest tensor x (N + 2) + fixed overhead, where the fixed overhead is the RSS of a
process that only imports polytask and torch plus the prefetch budget. The lean mode (``prefetch: 0``: no
read-ahead, no write-behind) is measured too: its peak above the import RSS, in units of the largest tensor.

    python benchmarks/merge_speed.py [--dir /tmp/merge-speed] [--n 2 4 8] [--no-mergekit] [--keep]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

CHILD = "child"
BUF = 16 * 2**20


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


def rss_of(cmd: list[str]) -> tuple[int, str, str, float, int]:
    """Run ``cmd`` and return (rc, stdout, stderr, wall s, peak RSS bytes) using wait4 on that one child."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
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
    ap.add_argument("--no-fsync", action="store_true")
    a = ap.parse_args(argv)
    from polytask.merging import merge_checkpoints

    t_imported = time.perf_counter()
    if a.import_only:
        print(json.dumps({"import_s": t_imported - T_START}))
        return
    params = {"density": 0.2} if a.method == "ties" else {}
    s = merge_checkpoints(a.base, a.models, a.method, a.out, params, options={"prefetch": a.prefetch,
                                                                                "fsync": not a.no_fsync})
    t_done = time.perf_counter()
    print(json.dumps({"import_s": t_imported - T_START, "merge_s": t_done - t_imported,
                      "input_bytes": s["input_bytes"], "output_bytes": s["output_bytes"]}))


def mergekit_exe() -> str | None:
    here = Path(sys.executable).parent / "mergekit-yaml"
    return str(here) if here.exists() else shutil.which("mergekit-yaml")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/merge-speed")
    ap.add_argument("--n", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties"])
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--prefetch", default="512MiB")
    ap.add_argument("--keep", action="store_true", help="keep the built models for another run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per polytask measurement (the minimum is kept; "
                    "shared machines are noisy)")
    args = ap.parse_args()

    import torch

    from polytask.merging.synthetic import make_model_family
    from polytask.merging.writer import parse_size

    root = Path(args.dir)
    layers, hidden, inter, vocab = 12, 768, 2048, 16000
    n_max = max(args.n)
    stamp = root / "family.json"
    want = {"layers": layers, "hidden": hidden, "intermediate": inter, "vocab": vocab, "n": n_max}
    t = time.perf_counter()
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_model_family(root / "models", n_max, layers=layers, hidden=hidden, intermediate=inter, vocab=vocab,
                          dtype=torch.float32)
        stamp.write_text(json.dumps(want))
    build_s = time.perf_counter() - t
    base = root / "models" / "base"
    variants = [root / "models" / f"ft{k}" for k in range(n_max)]
    from polytask.merging import open_checkpoint

    with open_checkpoint(base) as c:
        sizes = {n: c.info(n).nbytes for n in c.names()}
    params = sum(s // 4 for s in sizes.values())
    largest = max(sizes.values())

    can_drop = drop_caches()
    speed = None if can_drop else direct_read_speed(weight_files([base])[0])
    rc, out, err, _, import_rss = rss_of([sys.executable, __file__, CHILD, "--import-only"])
    import_s = json.loads(out)["import_s"] if rc == 0 else None
    exe = None if args.no_mergekit else mergekit_exe()
    mk_import_s = None
    if exe:
        rc, out, err, _, _ = rss_of([sys.executable, "-c", "import time; t=time.perf_counter(); "
                                     "import mergekit.scripts.run_yaml; print(time.perf_counter()-t)"])
        mk_import_s = float(out) if rc == 0 else None

    rows = []
    for n in args.n:
        dirs = [base, *variants[:n]]
        files = weight_files(dirs)
        if can_drop:
            drop_caches()
            nbytes, cold = read_all(files)
            floor_kind = "cold page cache (drop_caches)"
        else:
            nbytes = sum(f.stat().st_size for f in files)
            cold = nbytes / speed if speed else float("nan")
            floor_kind = "input bytes / O_DIRECT read speed"
        _, warm = read_all(files)
        for method in args.methods:
            row: dict[str, object] = {"n": n, "method": method, "input_bytes": nbytes, "read_floor_cold_s": cold,
                                      "read_floor_kind": floor_kind, "read_warm_s": warm}
            for cache, fsync, repeats in (("cold", True, args.repeats), ("cold_nofsync", False, 1),
                                          ("warm", True, args.repeats), ("lean_warm", True, 1)):
                times, procs, rsss = [], [], []
                for _ in range(repeats):
                    out_dir = root / f"out-{method}-{n}-{cache}"
                    shutil.rmtree(out_dir, ignore_errors=True)
                    if cache.startswith("cold"):
                        drop_caches()
                    else:
                        os.sync()
                        read_all(files)
                    cmd = [sys.executable, __file__, CHILD, "--base", str(base), "--models", *map(str, variants[:n]),
                           "--method", method, "--out", str(out_dir),
                           "--prefetch", "0" if cache.startswith("lean") else args.prefetch]
                    rc, out, err, wall, rss = rss_of(cmd + ([] if fsync else ["--no-fsync"]))
                    shutil.rmtree(out_dir, ignore_errors=True)
                    if rc != 0:
                        row[f"polytask_{cache}_error"] = err[-1500:]
                        break
                    times.append(json.loads(out)["merge_s"])
                    procs.append(wall)
                    rsss.append(rss)
                if times:
                    row[f"polytask_{cache}_s"] = min(times)
                    row[f"polytask_{cache}_all_s"] = times
                    row[f"polytask_{cache}_process_s"] = min(procs)
                    row[f"polytask_{cache}_peak_rss"] = max(rsss)
            row["ratio_to_cold_floor"] = row.get("polytask_cold_s", float("nan")) / cold
            row["ratio_to_cold_floor_nofsync"] = row.get("polytask_cold_nofsync_s", float("nan")) / cold
            row["ratio_warm_to_warm_read"] = row.get("polytask_warm_s", float("nan")) / warm
            bound = largest * (n + 2) + import_rss + parse_size(args.prefetch)
            peak = row.get("polytask_cold_peak_rss", 0)
            row["memory_bound_bytes"] = bound
            row["peak_over_bound"] = peak / bound
            row["peak_minus_import_in_largest_tensors"] = (peak - import_rss) / largest
            lean = row.get("polytask_lean_warm_peak_rss", 0)
            row["lean_peak_minus_import_in_largest_tensors"] = (lean - import_rss) / largest
            if exe:
                mk_dir = root / f"mk-{method}-{n}"
                shutil.rmtree(mk_dir, ignore_errors=True)
                cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                       "models": [{"model": str(v), "parameters": {"weight": 1.0, **({"density": 0.2}
                                                                   if method == "ties" else {})}}
                                  for v in variants[:n]]}
                cfg_path = root / f"mk-{method}-{n}.yml"
                cfg_path.write_text(json.dumps(cfg))
                drop_caches()
                rc, out, err, wall, rss = rss_of([exe, str(cfg_path), str(mk_dir), "--no-copy-tokenizer", "--quiet",
                                                  "--no-write-model-card", "--out-shard-size", "5B"])
                if rc != 0:
                    row["mergekit_error"] = err[-1500:]
                else:
                    row["mergekit_process_s"] = wall
                    row["mergekit_s_less_import"] = wall - (mk_import_s or 0.0)
                    row["mergekit_peak_rss"] = rss
                    ours = row.get("polytask_cold_s", float("nan"))
                    row["speedup_vs_mergekit"] = row["mergekit_s_less_import"] / ours
                    row["rss_ratio_vs_mergekit"] = row.get("polytask_cold_peak_rss", 0) / rss
                shutil.rmtree(mk_dir, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "benchmark": "merge_speed", "model": {"layout": "llama", "layers": layers, "hidden": hidden,
                                              "intermediate": inter, "vocab": vocab, "parameters": params,
                                              "dtype": "float32", "largest_tensor_bytes": largest},
        "cpus": os.cpu_count(), "drop_caches": can_drop, "odirect_bytes_per_s": speed,
        "polytask_import_s": import_s, "polytask_import_rss": import_rss, "mergekit_import_s": mk_import_s,
        "prefetch": args.prefetch, "build_s": build_s, "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
