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


def test_other_commands_refuse_to_run_under_torchrun(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.format(out=tmp_path, name="r"))
    done = polytask(["relate", str(tmp_path / "c.yaml")], tmp_path, world=2)
    assert done.returncode != 0
    assert "under torchrun only `polytask run`" in done.stderr
