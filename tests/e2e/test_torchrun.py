"""`torchrun -m polytask run CONFIG`: the whole run, data-parallel on two gloo processes, equals the one-process run."""

import json
import os
import subprocess
import sys

import pytest

CONFIG = """
seed: 3
suite:
  name: synthetic
  params: {{d: 8, groups: [2], unrelated: 1, conflicting_pairs: 0, n_train: 256, n_val: 64, n_test: 64}}
model: {{backbone: mlp, backbone_params: {{hidden: [16]}}}}
train: {{epochs: 2, batch_size: 64, optimizer: {{name: adam, lr: 0.01}}}}
methods: [famo, {{name: upgrad, grad_mode: representation}}]
baselines: {{single_task: true, cache: false}}
output: {{dir: {out}, name: {name}}}
"""


def polytask(args, tmp_path, world=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)] if world > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYTASK_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *launcher, "-m", "polytask", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    (tmp / "c.yaml").write_text(CONFIG.format(out=tmp, name="alone"))
    (tmp / "d.yaml").write_text(CONFIG.format(out=tmp, name="ddp"))
    alone = polytask(["run", str(tmp / "c.yaml"), "--quiet"], tmp)
    ddp = polytask(["run", str(tmp / "d.yaml"), "--quiet"], tmp, world=2)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return tmp, alone, ddp


def test_two_processes_give_the_one_process_results(runs):
    tmp, _, _ = runs
    one = json.loads((tmp / "alone" / "summary.json").read_text())["results"]
    two = json.loads((tmp / "ddp" / "summary.json").read_text())["results"]
    assert one.keys() == two.keys() == {"stl", "famo", "upgrad"}
    for method, res in one.items():
        for task, scores in res["tasks"].items():
            for metric, value in scores.items():
                assert two[method]["tasks"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), \
                    (method, task, metric)


def test_rank_zero_alone_writes_and_prints(runs):
    tmp, _, ddp = runs
    assert ddp.stdout.count("run directory:") == 1
    assert (tmp / "ddp" / "report.html").exists() and (tmp / "ddp" / "metrics.jsonl").exists()
    lines = (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()
    alone = (tmp / "alone" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(alone)  # one record per job, epoch, split and task: not one per rank
    assert json.loads((tmp / "ddp" / "jobs" / "famo" / "result.json").read_text())["world_size"] == 2


def test_other_commands_and_ray_refuse_to_run_under_torchrun(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.format(out=tmp_path, name="r"))
    done = polytask(["relate", str(tmp_path / "c.yaml")], tmp_path, world=2)
    assert done.returncode != 0
    assert "under torchrun only `polytask run`" in done.stderr
    done = polytask(["run", str(tmp_path / "c.yaml"), "--executor", "ray"], tmp_path, world=2)
    assert done.returncode != 0
    assert "executor.name: under torchrun the ranks train each job together" in done.stderr


FIT = """
import sys
import torch
from torch import nn
from torch.utils.data import TensorDataset
from polytask import fit

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
x = torch.randn(90, 5, generator=gen)
data = TensorDataset(x, x[:, 0] > 0, 2 * x[:, 1])  # (x, cls, reg): a custom model on a plain Dataset
val = TensorDataset(x[:30], x[:30, 0] > 0, 2 * x[:30, 1])


class Pairs(torch.utils.data.Dataset):
    def __init__(self, d):
        self.d = d

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        x, c, r = self.d[i]
        return x, {"cls": int(c), "reg": float(r)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.cls, self.reg = nn.Linear(16, 2), nn.Linear(16, 1)

    def forward(self, x):
        z = self.trunk(x)
        return {"cls": self.cls(z), "reg": self.reg(z).squeeze(-1)}


torch.manual_seed(0)
net = Net()
out = fit(net, [("cls", "classification", 2), ("reg", "regression", 1)], Pairs(data), Pairs(val), method="upgrad",
          epochs=2, batch_size=20, run_dir=sys.argv[1], heads={"cls": net.cls, "reg": net.reg}, seed=3, report=False)
print("world size", out.result.get("world_size", 1))
"""


def test_fit_under_torchrun_equals_fit_alone(tmp_path):
    script = tmp_path / "fit_script.py"
    script.write_text(FIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world, name in ((1, "alone"), (2, "ddp")):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if world > 1 else []
        done = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"world size {world}" in done.stdout
    one = json.loads((tmp_path / "alone" / "summary.json").read_text())["results"]["upgrad"]["tasks"]
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())["results"]["upgrad"]["tasks"]
    assert one.keys() == two.keys() == {"cls", "reg"}
    for task, scores in one.items():
        for metric, value in scores.items():
            assert two[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_the_readme_torchrun_command_runs(tmp_path):
    """README's "More than one process" command, as written (shrunk to one epoch of two methods)."""
    import re
    import shlex
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    line = next(m for m in re.findall(r"^torchrun .*$", (root / "README.md").read_text(), flags=re.M))
    args = shlex.split(line.split("  #")[0])
    assert args[:4] == ["torchrun", "--nproc-per-node", "2", "-m"] and args[4] == "polytask"
    shutil.copytree(root / "examples", tmp_path / "examples")
    shrink = ["--set", "train.epochs=1", "--set", "methods=[equal,upgrad]", "--set", "baselines.single_task=false",
              "--set", "suite.params.n_train=512"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args[1:], *shrink],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name = next(a.split("=", 1)[1] for a in args if a.startswith("output.name="))
    result = json.loads((tmp_path / "runs" / name / "jobs" / "upgrad" / "result.json").read_text())
    assert result["world_size"] == 2
