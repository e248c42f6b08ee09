"""polytask.fit: the user's own nn.Module on torch Datasets/DataLoaders, through the engine, with exact resume.

Run as a script (``python test_fit.py RUN_DIR``), this module trains the custom-model job into RUN_DIR: the
kill-and-resume test runs it in a subprocess that ``POLYTASK_KILL_AT`` kills mid-run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from polytask.engine.data import DatasetBatches, TensorBatches
from polytask.errors import ConfigError, DataError
from polytask.flows.fit import fit
from polytask.tasks.task import Task, TaskData

ROOT = Path(__file__).resolve().parents[2]
TASKS = [("cls", "classification", 2), ("reg", "regression", 1)]


class Rows(Dataset):
    """A map-style multi-target source; every third row lacks its ``reg`` label (None), so it is masked."""

    def __init__(self, n, seed):
        self.x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return x, {"cls": int(x[0] > 0), "reg": None if i % 3 == 0 else float(2 * x[1])}


class Stream(IterableDataset):
    """The same rows as an iterable source (no length)."""

    def __init__(self, n, seed, only=None):
        self.rows, self.only = Rows(n, seed), only

    def __iter__(self):
        for i in range(len(self.rows)):
            x, y = self.rows[i]
            yield (x, y[self.only]) if self.only else (x, y)


class Net(nn.Module):
    """A user's model: its own trunk and heads, returning a dict task -> output; dropout so RNG state matters."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2))
        self.cls, self.reg = nn.Linear(16, 2), nn.Linear(16, 1)

    def forward(self, x):
        z = self.trunk(x)
        return {"cls": self.cls(z), "reg": self.reg(z).squeeze(-1)}


def run(run_dir, method="uw", **kw):
    torch.manual_seed(0)
    net = Net()
    return fit(net, TASKS, DataLoader(Rows(60, 0), batch_size=8), Rows(20, 1), method=method, epochs=3,
               run_dir=run_dir, heads={"cls": net.cls, "reg": net.reg}, seed=3, report=False, **kw)


def test_fit_trains_a_custom_model_into_a_run_directory(tmp_path):
    torch.manual_seed(0)
    net = Net()
    out = fit(net, TASKS, DataLoader(Rows(60, 0), batch_size=8), DataLoader(Rows(20, 1)), method="upgrad",
              mode="representation", encoder=net.trunk, heads={"cls": net.cls, "reg": net.reg}, epochs=2,
              run_dir=tmp_path / "run", seed=1)
    assert out.model is net and out.result["steps"] == 2 * 8
    names = {p.name for p in out.run_dir.iterdir()}
    assert {"summary.json", "metrics.jsonl", "report.html", "run.json", "jobs"} <= names
    summary = json.loads((out.run_dir / "summary.json").read_text())
    assert set(summary["results"]["upgrad"]["tasks"]) == {"cls", "reg"}
    assert (out.run_dir / "jobs" / "fit" / "best.safetensors").is_file()
    # the returned module holds the best-validation weights the engine kept
    from safetensors.torch import load_file
    best = load_file(out.run_dir / "jobs" / "fit" / "best.safetensors")
    assert torch.equal(best["model.cls.weight"], net.cls.weight.detach())


def test_dataset_batches_follow_the_in_memory_order():
    """Map-style data is read in the order TensorBatches uses: a pure function of (seed, epoch, step)."""
    tasks = [Task(*t) for t in TASKS]
    rows = Rows(30, 0)
    x = torch.stack([rows[i][0] for i in range(30)])
    y = {"cls": torch.tensor([float(rows[i][1]["cls"]) for i in range(30)]),
         "reg": torch.tensor([float("nan") if rows[i][1]["reg"] is None else rows[i][1]["reg"] for i in range(30)])}
    mem = TensorBatches({s: [TaskData(x, y)] for s in ("train", "val", "test")}, 8)
    src = DatasetBatches(tasks, DataLoader(rows, batch_size=8, shuffle=True), rows)
    assert src.steps_per_epoch() == mem.steps_per_epoch() == 4
    for epoch in (0, 1):
        for step in (0, 3):
            got, want = src.epoch(5, epoch)[step].sources[0], mem.epoch(5, epoch)[step]
            r = want.rows[0]
            assert torch.equal(got.x, x[r]) and torch.equal(got.y["cls"], y["cls"][r])
            assert torch.equal(got.y["reg"].isnan(), y["reg"][r].isnan())
    assert torch.equal(src.epoch(5, 1)[2].sources[0].x, src.epoch(5, 1)[2].sources[0].x)


def test_one_source_per_task_and_iterable_data(tmp_path):
    """A dict task -> source yielding (x, y), sources of different lengths; an iterable multi-task source."""
    torch.manual_seed(0)
    out = fit(Net(), TASKS, {"cls": Rows(40, 0), "reg": Rows(24, 3)}, {"cls": Rows(20, 1), "reg": Rows(20, 2)},
              method="equal", epochs=1, batch_size=8, run_dir=tmp_path / "dict", report=False)
    assert out.result["steps"] == 5 and set(out.result["test"]) == {"cls", "reg"}
    out = fit(Net(), TASKS, Stream(40, 0), Stream(16, 1), method="mgda", epochs=2, batch_size=8,
              steps_per_epoch=5, run_dir=tmp_path / "iterable", report=False, accumulate=2)
    assert out.result["steps"] == 2 * 3 and set(out.result["val"]) == {"cls", "reg"}  # 5 batches: 3 optimiser steps
    tasks = [Task(*t) for t in TASKS]
    with pytest.raises(DataError, match="IterableDataset without __len__ needs steps"):
        DatasetBatches(tasks, Stream(40, 0), Rows(20, 1))
    with pytest.raises(DataError, match=r"task\(s\) \['reg'\] have none"):
        DatasetBatches(tasks, {"cls": Rows(40, 0)}, Rows(20, 1))
    # a resumed epoch of an iterable source re-reads it and skips the batches already trained
    def stream():
        return DatasetBatches(tasks, Stream(40, 0), Rows(20, 1), batch_size=8, steps=5).epoch(0, 0)

    whole = stream()
    read = [whole[i].sources[0].x for i in range(5)]
    assert torch.equal(stream()[3].sources[0].x, read[3]) and not torch.equal(read[3], read[2])
    with pytest.raises(DataError, match="read forwards only"):
        whole[1]
    src = DatasetBatches(tasks, Stream(40, 0, only="cls"), Rows(20, 1), steps=5)
    with pytest.raises(DataError, match="train: the targets of a multi-task source must be a dict"):
        src.epoch(0, 0)[0]


def test_data_errors_name_the_source_and_task():
    tasks = [Task(*t) for t in TASKS]

    class Odd(Rows):
        def __getitem__(self, i):
            return self.x[i], {"clss": 1}

    with pytest.raises(DataError, match=r"train: label\(s\) for unknown task\(s\) \['clss'\]"):
        DatasetBatches(tasks, Odd(10, 0), Rows(10, 1)).epoch(0, 0)[0]
    with pytest.raises(DataError, match=r"val: source for unknown task 'nope'"):
        DatasetBatches(tasks, Rows(10, 0), {"nope": Rows(10, 1)})


def test_model_missing_a_task_output_is_named(tmp_path):
    class Half(Net):
        def forward(self, x):
            return {"cls": super().forward(x)["cls"]}

    with pytest.raises(DataError, match=r"no entry for task\(s\) \['reg'\]"):
        fit(Half(), TASKS, Rows(16, 0), Rows(8, 1), epochs=1, run_dir=tmp_path / "r", report=False)
    with pytest.raises(ConfigError, match="pass encoder="):  # before anything is written
        fit(Net(), TASKS, Rows(16, 0), Rows(8, 1), method="upgrad", mode="representation", run_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_kill_and_resume_is_bit_identical(tmp_path):
    want = run(tmp_path / "straight", checkpoint_every=3)
    env = {**os.environ, "POLYTASK_KILL_AT": "step:13"}  # epoch 1 checkpointed, then steps 9, 12: killed after 13
    killed = subprocess.run([sys.executable, __file__, str(tmp_path / "killed")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    ckpt = tmp_path / "killed" / "jobs" / "fit" / "last.safetensors"
    assert ckpt.is_file() and not (tmp_path / "killed" / "summary.json").exists()
    got = run(tmp_path / "killed", checkpoint_every=3)
    for name in ("last.safetensors", "best.safetensors"):
        assert (tmp_path / "killed" / "jobs" / "fit" / name).read_bytes() == \
            (tmp_path / "straight" / "jobs" / "fit" / name).read_bytes()
    assert got.result["history"] == want.result["history"] and got.result["test"] == want.result["test"]


def test_example_runs_and_fit_is_exported_lazily(tmp_path):
    """The example as a script, in a process where ``import polytask`` has not imported torch until ``fit`` is used."""
    code = ("import runpy, sys, polytask; assert 'torch' not in sys.modules; "
            "assert polytask.fit.__module__ == 'polytask.flows.fit', polytask.fit; "
            f"runpy.run_path({str(ROOT / 'examples' / 'fit_custom_model.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and (tmp_path / "runs" / "fit-example" / "report.html").is_file()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], checkpoint_every=3)


def test_a_run_directory_in_use_is_refused_and_released_after(tmp_path):
    """fit locks its run directory: while another holder has it, fit refuses before writing; once fit returns (or
    fails), the lock is free again."""
    from polytask.errors import RunLockedError
    from polytask.flows.runner import LOCK
    from polytask.io import DirLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with DirLock(run_dir, LOCK), pytest.raises(RunLockedError, match="in use"):
        run(run_dir)
    assert not (run_dir / "run.json").exists()
    run(run_dir)
    with DirLock(run_dir, LOCK):  # fit gave it up
        pass
