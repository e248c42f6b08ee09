"""The user's own model and suite named by import path in a config (``model.factory``, ``suite.factory``), run
by the CLI in a subprocess with the user's package on PYTHONPATH."""

import json
import os
import subprocess
import sys

import pytest

from polytask.config import Config, check
from polytask.errors import ConfigError

CLI = [sys.executable, "-m", "polytask.cli"]

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, tasks, input_shape, width):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU())
        self.heads = nn.ModuleDict({t.name: nn.Linear(width, t.n_outputs) for t in tasks})

    def forward(self, x):
        z = self.trunk(x)
        return {name: head(z).squeeze(-1) if head.out_features == 1 else head(z) for name, head in self.heads.items()}


def build(tasks, input_shape, width=8):
    return Net(tasks, input_shape, width)
'''

DATA = '''
import torch
from polytask.tasks.task import Task, TaskData, TaskSuite


def tasks(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = {"sign": (x[:, 0] > 0).float(), "size": x.norm(dim=1)}
    y["size"][::5] = float("nan")  # missing labels
    cut = [0, n // 2, 3 * n // 4, n]
    splits = {s: (TaskData(x[a:b], {k: v[a:b] for k, v in y.items()}),)
              for s, a, b in zip(("train", "val", "test"), cut, cut[1:])}
    return TaskSuite("mine", (Task("sign", "classification", 2), Task("size", "regression", 1)), splits)
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "code" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    (pkg / "data.py").write_text(DATA)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    return tmp_path / "code"


def test_cli_runs_the_users_model_and_suite(tmp_path, package):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
seed: 1
suite: {{factory: "mypkg.data:tasks", params: {{n: 160}}}}
model: {{factory: "mypkg.nets:build", backbone_params: {{width: 6}}}}
train: {{epochs: 2, batch_size: 16, checkpoint_every: 3}}
methods: [upgrad]
baselines: {{single_task: false}}
output: {{dir: {tmp_path}, name: r}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*CLI, "run", str(cfg)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["suite"]["name"] == "mine" and list(summary["results"]) == ["upgrad"]
    assert set(summary["results"]["upgrad"]["tasks"]) == {"sign", "size"}
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "r" / "jobs" / "upgrad" / "best.safetensors")
    assert weights["model.trunk.1.weight"].shape == (6, 4)  # the user's module, built with backbone_params
    # and a trained run of the user's model answers new rows
    import torch

    import polytask
    out = polytask.load(tmp_path / "r", "upgrad").predict(torch.randn(5, 4))
    assert set(out) == {"sign", "size"} and len(out["sign"]) == 5


@pytest.mark.parametrize(("section", "path", "message"), [
    ("suite", "nosuchpkg.data:tasks",
     r"suite.factory: cannot import module 'nosuchpkg.data' of 'nosuchpkg.data:tasks'"),
    ("suite", "mypkg.data:nothing", r"suite.factory: module 'mypkg.data' has no attribute 'nothing'"),
    ("model", "mypkg.nets:nope", r"model.factory: module 'mypkg.nets' has no attribute 'nope'"),
    ("model", "nosuch:build", r"model.factory: cannot import module 'nosuch'"),
])
def test_a_missing_factory_is_a_config_error_naming_key_and_path(package, section, path, message):
    with pytest.raises(ConfigError, match=message):
        check(Config.model_validate({section: {"factory": path}}))


def test_a_malformed_factory_path_is_refused():
    with pytest.raises(Exception, match="factory"):
        Config.model_validate({"model": {"factory": "mypkg.nets.build"}})
