"""Data-parallel training (polytask.engine.distributed) with two real gloo processes started by torchrun.

N processes with global batch B must take the steps of one process with batch B (to float rounding), every rank must
hold the same parameters, and a run killed on one rank must resume exactly, also on another world size.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker

WORKER = Path(worker.__file__)


def torchrun(out: Path, cases: list[str], epochs: int = 2, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(out), ",".join(cases), str(epochs)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def ranks(out: Path, case: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / f"{case}.rank{r}.safetensors") for r in (0, 1)]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(out, list(worker.CASES))
    return out


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_processes_take_the_steps_of_one_process_with_the_global_batch(two_process_runs, case, tmp_path):
    """mean, uw, famo, pcgrad, nashmtl and upgrad (aggregators in both gradient modes, and with gradient
    accumulation), uneven shards and a task with missing labels: the data-parallel parameters equal the
    single-process ones to float tolerance, and both ranks hold the same bits."""
    r0, r1 = ranks(two_process_runs, case)
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the ranks' parameters differ"
    alone = worker.trained(case, tmp_path)
    assert_close(r0, alone)
    start = worker.spec(case, tmp_path / "init")
    torch.manual_seed(0)
    init = worker.build_model(start.tasks, (6,), "mlp", {"hidden": [16]}).state_dict()
    assert any(not torch.allclose(init[k], r0[k]) for k in init), "nothing trained"


def test_a_run_killed_on_one_rank_resumes_exactly(tmp_path, two_process_runs):
    """Rank 1 SIGKILLs itself after step 7 (epoch 2 of 2); torchrun stops rank 0; the rerun resumes from rank 0's
    epoch-1 checkpoint and ends with the bits of the uninterrupted two-process run."""
    case = "upgrad-representation"
    killed = torchrun(tmp_path, [case], env={"POLYTASK_KILL_AT": "step:7", "POLYTASK_KILL_RANK": "1"},
                      check=False)
    assert killed.returncode != 0
    assert not (tmp_path / f"{case}.rank0.safetensors").exists()
    checkpoint = tmp_path / "jobs" / case / "last.safetensors"
    assert checkpoint.exists(), "no checkpoint was written before the kill"
    torchrun(tmp_path, [case])
    for again, straight in zip(ranks(tmp_path, case), ranks(two_process_runs, case), strict=True):
        assert all(torch.equal(again[k], straight[k]) for k in again)


def test_a_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    """World size is not in the checkpoint: one epoch on two processes, the second in this one, equals two epochs
    in one process to float tolerance."""
    case = "nashmtl-representation"
    torchrun(tmp_path, [case], epochs=1)
    resumed = worker.trained(case, tmp_path / "jobs", epochs=2)  # the job's directory holds the 2-process checkpoint
    straight = worker.trained(case, tmp_path / "alone", epochs=2)
    assert_close(resumed, straight)
    one_epoch = load_file(tmp_path / f"{case}.rank0.safetensors")
    assert any(not torch.allclose(one_epoch[k], resumed[k]) for k in resumed), "the second epoch did not train"
