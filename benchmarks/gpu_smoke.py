"""GPU smoke check (needs CUDA): a run, a SIGKILL-and-resume on the GPU compared bit for bit with an
uninterrupted GPU run, and relate with probes on the GPU. Prints one JSON object.
Usage: python benchmarks/gpu_smoke.py [--out /tmp/gpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = """
seed: 1
suite: {{name: multidigits, params: {{n_train: 1024, n_val: 256, n_test: 256}}}}
model: {{backbone: lenet, backbone_params: {{dropout: 0.1}}}}
train: {{epochs: 3, batch_size: 64, checkpoint_every: 7, device: cuda}}
methods: [equal, famo, nashmtl, {{name: pcgrad, grad_mode: representation}}, {{name: upgrad, sam_rho: 0.05}}]
relate: {{estimators: [lookahead, grad_cosine, datamap], every: 4}}
output: {{dir: {out}, name: {name}}}
"""


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def weights(run: Path) -> dict:
    return {f"{f.parent.name}/{k}": v for f in sorted(run.glob("jobs/*/best.safetensors"))
            for k, v in load_file(f).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-smoke")
    out = Path(ap.parse_args().out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, POLYTASK_CACHE_DIR=str(out / "cache"))
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__}
    for name in ("ref", "killed"):
        (out / f"{name}.yaml").write_text(CONFIG.format(out=out, name=name))
    t = time.perf_counter()
    r = cli("run", str(out / "ref.yaml"), "--quiet", "--set", "baselines.cache=false", env=env)
    report["run_s"], report["run_rc"] = round(time.perf_counter() - t, 1), r.returncode
    report["run_stdout_tail"] = r.stdout[-1500:] if r.returncode == 0 else r.stderr[-3000:]
    r = cli("run", str(out / "killed.yaml"), "--quiet", "--set", "baselines.cache=false",
            env=env | {"POLYTASK_KILL_AT": "step:100"})
    report["killed_rc"] = r.returncode
    r = cli("run", "--resume", str(out / "killed"), "--quiet", env=env)
    report["resume_rc"] = r.returncode
    if r.returncode == 0 and report["run_rc"] == 0:
        a, b = weights(out / "ref"), weights(out / "killed")
        report["resume_bit_identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        report["resume_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() \
            else None
    else:
        report["resume_stderr"] = r.stderr[-3000:]
    (out / "rel.yaml").write_text(CONFIG.format(out=out, name="rel"))
    r = cli("relate", str(out / "rel.yaml"), "--quiet", env=env)
    report["relate_rc"] = r.returncode
    report["relate_tail"] = r.stdout[-1200:] if r.returncode == 0 else r.stderr[-3000:]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
