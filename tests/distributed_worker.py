"""Train every equivalence case of tests/core/test_distributed.py, in this process or as one rank under torchrun.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT`` trains each case
data-parallel and writes, per case and rank, the final parameters to ``OUT/<case>.rank<r>.safetensors``; the test
imports :func:`spec` to train the same cases in one process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from polytask.config import MethodConfig
from polytask.engine.data import TensorBatches
from polytask.engine.loop import train_job
from polytask.engine.optim import optimizer
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import build_method
from polytask.models import build_model
from polytask.tasks import build_suite

AGGREGATORS = ("mean", "pcgrad", "nashmtl", "upgrad")
CASES = {"uw": ("uw", "params", 1), "famo": ("famo", "params", 1), "equal-accumulate": ("equal", "params", 2)}
CASES |= {f"{a}-{mode}": (a, mode, 1) for a in AGGREGATORS for mode in ("params", "representation")}
CASES |= {"upgrad-representation-accumulate": ("upgrad", "representation", 2),
          "pcgrad-params-accumulate": ("pcgrad", "params", 2)}
# 203 training rows in batches of 50: the last batch has 3 rows, so two ranks hold 2 and 1 (uneven shards); one task
# misses 30 % of its labels, so each rank's share of a task's rows differs from its share of the batch
SUITE = {"d": 6, "groups": [3], "unrelated": 0, "conflicting_pairs": 0, "n_train": 203, "n_val": 64, "n_test": 64,
         "missing": {"g0_t1": 0.3}}


def spec(case: str, out: Path, epochs: int = 2) -> TrainSpec:
    """The job of ``case`` (method, gradient mode, micro-batches per step) with its checkpoints under ``out``."""
    name, mode, accumulate = CASES[case]
    suite = build_suite("synthetic", SUITE, seed=0)
    method = build_method(MethodConfig(name=name, grad_mode=mode), suite.task_names)
    return TrainSpec(name=case, tasks=list(suite.tasks),
                     model=lambda: build_model(suite.tasks, suite.input_shape, "mlp", {"hidden": [16]}),
                     optimizer=optimizer("adam", {"lr": 1e-2}), method=method,
                     data=TensorBatches(suite.splits, batch_size=50 // accumulate), epochs=epochs,
                     checkpoint=CheckpointPolicy(out / case, 0), seed=3, accumulate=accumulate)


def trained(case: str, out: Path, epochs: int = 2) -> dict[str, torch.Tensor]:
    """The final parameters of ``case`` trained here (data-parallel when this process is a torchrun rank)."""
    s = spec(case, out, epochs)
    s.checkpoint.dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model(s.tasks, (6,), "mlp", {"hidden": [16]})
    result = train_job(replace(s, model=model, select="last"))
    assert result["steps"] > 0
    assert result.get("world_size", 1) == int(os.environ.get("WORLD_SIZE", "1")), "not data-parallel"
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    cases = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    rank = int(os.environ.get("RANK", "0"))
    for case in cases:
        save_file(trained(case, out / "jobs", epochs), str(out / f"{case}.rank{rank}.safetensors"))
