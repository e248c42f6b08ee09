"""polytask's merges against mergekit's on the same inputs: max |difference| per method, as JSON.

Builds a small Llama-layout base and three perturbed variants (float32 HF directories), merges them with
mergekit's ``mergekit-yaml`` and with polytask for each method whose semantics are the same, and compares
every output tensor. DARE is compared at drop rate 0 only: its random masks come from different random
streams (mergekit: the global torch RNG in graph order; polytask: one seeded stream per tensor and model)
and mergekit rescales survivors to the L1 norm instead of by 1/(1-p). mergekit is not a dependency of
polytask: install it (into this venv or another) to run this script.

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

from polytask.merging import ModelInput, merge_checkpoints, open_checkpoint
from polytask.merging.synthetic import make_model_family

WEIGHTS = [1.0, 0.5, 0.8]
DENSITY = [0.2, 0.5, 0.3]

# (label, mergekit method, mergekit shared params, mergekit per-model params, polytask method, polytask params,
#  polytask per-model params)
CASES = [
    ("linear", "linear", {}, [{"weight": w} for w in WEIGHTS], "average", {}, [{}, {}, {}]),
    ("task_arithmetic", "task_arithmetic", {"lambda": 0.7}, [{"weight": w} for w in (1.0, 0.5, -0.3)],
     "task_arithmetic", {"lambda": 0.7}, [{}, {}, {}]),
    ("ties", "ties", {"lambda": 1.0}, [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITY, strict=True)],
     "ties", {"lambda": 1.0}, [{"density": d} for d in DENSITY]),
    ("ties_sum", "ties", {"lambda": 0.9, "normalize": False},
     [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITY, strict=True)],
     "ties", {"lambda": 0.9, "normalize": False}, [{"density": d} for d in DENSITY]),
    ("dare_linear_p0", "dare_linear", {}, [{"weight": w, "density": 1.0} for w in WEIGHTS],
     "dare", {"drop_rate": 0.0}, [{}, {}, {}]),
    ("dare_ties_p0", "dare_ties", {}, [{"weight": w, "density": 1.0} for w in WEIGHTS],
     "dare_ties", {"drop_rate": 0.0, "normalize": False}, [{}, {}, {}]),
    ("breadcrumbs", "breadcrumbs", {}, [{"weight": w, "density": 0.8, "gamma": 0.05} for w in WEIGHTS],
     "breadcrumbs", {"density": 0.8, "gamma": 0.05}, [{}, {}, {}]),
    ("breadcrumbs_ties", "breadcrumbs_ties", {}, [{"weight": w, "density": 0.7, "gamma": 0.02} for w in WEIGHTS],
     "generalized", {"sparsify": ["band"], "consensus": True, "normalize": False, "density": 0.7, "gamma": 0.02},
     [{}, {}, {}]),
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
        for label, mk_method, mk_params, mk_models, pt_method, pt_params, pt_models in CASES:
            cfg = {"merge_method": mk_method, "dtype": "float32", "out_dtype": "float32",
                   "models": [{"model": str(m), "parameters": p} for m, p in zip(models, mk_models, strict=True)]}
            if mk_method != "linear":
                cfg["base_model"] = str(base)
            if mk_params:
                cfg["parameters"] = mk_params
            cfg_path = root / f"{label}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            mk_out = root / f"mk-{label}"
            r = subprocess.run([exe, str(cfg_path), str(mk_out), "--no-copy-tokenizer", "--random-seed", "0",
                                "--quiet", "--no-write-model-card"], capture_output=True, text=True)
            if r.returncode != 0:
                out[label] = {"error": r.stderr[-2000:]}
                continue
            pt_out = root / f"pt-{label}"
            weights = [p["weight"] for p in mk_models]
            merge_checkpoints(base if pt_method != "average" else models[0],
                              [ModelInput(str(m), w, p) for m, w, p in zip(models, weights, pt_models, strict=True)],
                              pt_method, pt_out, pt_params, copy_files=False, options={"fsync": False})
            a, b = tensors(mk_out), tensors(pt_out)
            if set(a) != set(b):
                out[label] = {"error": f"different tensor names: {sorted(set(a) ^ set(b))[:5]}"}
                continue
            diffs = {n: float((a[n].double() - b[n].double()).abs().max()) for n in a}
            worst = max(diffs, key=diffs.get)
            out[label] = {"mergekit": mk_method, "polytask": pt_method, "tensors": len(a),
                          "max_abs_diff": diffs[worst], "worst_tensor": worst, "within_1e-6": diffs[worst] <= 1e-6}
        print(json.dumps({"benchmark": "merge_vs_mergekit", "dtype": "float32", "models": 3,
                          "note": "DARE compared at drop rate 0 only (different RNG streams and rescaling)",
                          "results": out}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
