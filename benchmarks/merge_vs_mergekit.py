"""polytask's merges against mergekit's on the same inputs and the same YAML: max |difference| per method, as JSON.

Builds a small Llama-layout base and three perturbed variants (HF directories), writes one mergekit config per
method, runs it with mergekit's ``mergekit-yaml CONFIG OUT`` and the very same file with polytask
(``load_merge_config(CONFIG, output=OUT)``, what ``polytask merge CONFIG OUT`` runs), and compares every output
tensor. DARE is compared at density 1 only: its random masks come from different random streams (mergekit: the
global torch RNG in graph order; polytask: one seeded stream per tensor and model) and mergekit rescales
survivors to the L1 norm instead of by 1/(1-p).

bf16 TIES with one model isolates the trim (both tools computing in float32, writing bf16): both must keep
exactly k = int(density * n) entries of each task-vector tensor. Many bf16 magnitudes tie at the threshold;
mergekit breaks those ties by an unstable argsort (arbitrary positions), polytask by index (``trim_ties:
first``), so the kept counts agree while some positions differ (only among tied entries). mergekit is not a
dependency of polytask: install it (into this venv or another, e.g. ``python3 -m venv /tmp/mkvenv &&
/tmp/mkvenv/bin/pip install torch mergekit``) to run this.

    python benchmarks/merge_vs_mergekit.py [--mergekit-yaml PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from polytask.merging import load_merge_config, open_checkpoint, run_merge_config
from polytask.merging.ops import trim_ranks
from polytask.merging.synthetic import make_model_family

WEIGHTS = [1.0, 0.5, 0.8]
DENSITY = [0.2, 0.5, 0.3]

# (label, mergekit method, shared parameters, per-model parameters)
CASES = [
    ("linear", "linear", {}, [{"weight": w} for w in WEIGHTS]),
    ("task_arithmetic", "task_arithmetic", {"lambda": 0.7}, [{"weight": w} for w in (1.0, 0.5, -0.3)]),
    ("ties", "ties", {"lambda": 1.0}, [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITY, strict=True)]),
    ("ties_sum", "ties", {"lambda": 0.9, "normalize": False},
     [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITY, strict=True)]),
    ("dare_linear_density1", "dare_linear", {}, [{"weight": w, "density": 1.0} for w in WEIGHTS]),
    ("dare_ties_density1", "dare_ties", {}, [{"weight": w, "density": 1.0} for w in WEIGHTS]),
    ("breadcrumbs", "breadcrumbs", {}, [{"weight": w, "density": 0.8, "gamma": 0.05} for w in WEIGHTS]),
    ("breadcrumbs_ties", "breadcrumbs_ties", {}, [{"weight": w, "density": 0.7, "gamma": 0.02} for w in WEIGHTS]),
]


def mergekit_yaml_path(given: str | None) -> str:
    if given:
        return given
    here = Path(sys.executable).parent / "mergekit-yaml"
    if here.exists():
        return str(here)
    found = shutil.which("mergekit-yaml")
    if not found:
        raise SystemExit(json.dumps({"error": "mergekit-yaml not found; pip install mergekit (benchmark only)"}))
    return found


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as c:
        return {n: c.load(n) for n in c.names()}


def run_both(exe: str, cfg: dict, root: Path, label: str) -> tuple[dict, dict] | str:
    """Write ``cfg`` once, merge it with mergekit and with polytask; the two outputs, or mergekit's error."""
    cfg_path = root / f"{label}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    mk_out, pt_out = root / f"mk-{label}", root / f"pt-{label}"
    r = subprocess.run([exe, str(cfg_path), str(mk_out), "--no-copy-tokenizer", "--random-seed", "0", "--quiet",
                        "--no-write-model-card"], capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr[-2000:]
    config = load_merge_config(cfg_path, output=pt_out)  # the same file, unchanged
    config.options.fsync = False
    run_merge_config(config)
    return tensors(mk_out), tensors(pt_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-yaml", default=None)
    ap.add_argument("--keep", default=None, help="build in this directory and keep it")
    args = ap.parse_args()
    exe = mergekit_yaml_path(args.mergekit_yaml)
    root = Path(args.keep or tempfile.mkdtemp(prefix="merge-vs-mergekit-"))
    try:
        base, models = make_model_family(root / "models", 3, layers=2, hidden=64, intermediate=128, vocab=256,
                                         scale=0.01)
        out: dict[str, dict[str, object]] = {}
        for label, method, shared, per_model in CASES:
            cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "float32",
                   "models": [{"model": str(m), "parameters": p} for m, p in zip(models, per_model, strict=True)]}
            if method != "linear":
                cfg["base_model"] = str(base)
            if shared:
                cfg["parameters"] = shared
            got = run_both(exe, cfg, root, label)
            if isinstance(got, str):
                out[label] = {"error": got}
                continue
            a, b = got
            if set(a) != set(b):
                out[label] = {"error": f"different tensor names: {sorted(set(a) ^ set(b))[:5]}"}
                continue
            diffs = {n: float((a[n].double() - b[n].double()).abs().max()) for n in a}
            worst = max(diffs, key=diffs.get)
            out[label] = {"mergekit": method, "tensors": len(a), "max_abs_diff": diffs[worst], "worst_tensor": worst,
                          "within_1e-6": diffs[worst] <= 1e-6}

        # bf16 TIES, one model: the trim alone, where magnitudes tie
        bf_base, bf_models = make_model_family(root / "bf16", 1, layers=2, hidden=64, intermediate=128, vocab=256,
                                               scale=0.01, dtype=torch.bfloat16)
        density = 0.3
        # both compute in float32 (mergekit's dtype: bfloat16 would round the task vectors first) and write bf16
        cfg = {"merge_method": "ties", "base_model": str(bf_base), "dtype": "float32", "out_dtype": "bfloat16",
               "models": [{"model": str(bf_models[0]), "parameters": {"weight": 1.0, "density": density}}]}
        got = run_both(exe, cfg, root, "ties_bf16_one_model")
        if isinstance(got, str):
            out["ties_bf16_one_model"] = {"error": got}
        else:
            a, b = got
            base_t, model_t = tensors(bf_base), tensors(bf_models[0])
            exact = {"mergekit": 0, "polytask": 0}
            differ, ties_only, total = 0, True, 0
            for n in a:
                tau = model_t[n].float() - base_t[n].float()
                nonzero = int(tau.count_nonzero())
                ranks = trim_ranks("magnitude", tau.numel(), density)
                k = min(ranks[0], nonzero) if ranks else nonzero
                for tool, t in (("mergekit", a[n]), ("polytask", b[n])):
                    exact[tool] += int((t.float() != base_t[n].float()).sum()) == k
                d = a[n] != b[n]
                differ += int(d.sum())
                total += d.numel()
                if d.any():  # every differing position holds a magnitude tied with the threshold
                    thr = tau.abs().reshape(-1).kthvalue(tau.numel() - k + 1).values
                    ties_only &= bool((tau.abs()[d] == thr).all())
            out["ties_bf16_one_model"] = {
                "tensors": len(a), "tensors_with_exactly_k_kept": exact, "entries_differing": differ,
                "fraction_differing": differ / total, "differences_only_at_tied_magnitudes": ties_only}
        print(json.dumps({"benchmark": "merge_vs_mergekit", "models": 3, "same_yaml_for_both": True,
                          "note": "DARE compared at density 1 only (different RNG streams and rescaling); "
                                  "bf16 TIES: tie-breaking differs (mergekit: unstable argsort), counts agree",
                          "results": out}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
