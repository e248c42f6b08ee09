"""The Ray executor (polytask.flows.executor) on a real local Ray cluster started by this module: the same files and
results as the sequential executor bit for bit, and a worker killed mid-job by its pid is replaced and the job
resumes from its checkpoint. Skipped only when ray is not importable."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import tiny_config_yaml
from polytask.config import Config, load_config
from polytask.engine.hooks import Hook
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError, DivergenceError
from polytask.flows.executor import Work, as_work, with_executor, workers_of
from polytask.flows.jobs import Job
from polytask.flows.merge import run_merge_experiment
from polytask.flows.run import run
from polytask.merging.config import ExperimentConfig

NO_CACHE = "baselines: {cache: false}\n"


@pytest.fixture(scope="module")
def cluster():
    """One local two-CPU Ray cluster for the module (skipped only where ray is not importable); this module's hook
    class travels to the workers by value."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class PauseOnce(Hook):
    """Rides on job ``job``: records, per process, the first global step it sees (``first-<pid>.json``), and at
    ``at_step``, once its job has a checkpoint on disk and unless ``pid`` was already written, writes the worker's pid
    and waits to be killed (at most ``limit`` seconds, then fails the job)."""

    name = "pause_once"

    def __init__(self, job: str, at_step: int, job_dir: Path, out: Path, limit: float = 120.0) -> None:
        self.job, self.at_step, self.job_dir, self.out, self.limit = job, at_step, job_dir, out, limit

    def on_step(self, run_, step) -> None:
        if run_.name != self.job:
            return
        first = self.out / f"first-{os.getpid()}.json"
        if not first.exists():
            first.write_text(json.dumps({"pid": os.getpid(), "global_step": step.global_step}))
        if step.global_step != self.at_step or (self.out / "pid").exists():
            return
        deadline = time.monotonic() + self.limit
        while not (self.job_dir / "last.safetensors").exists():  # the background writer's first checkpoint
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        tmp = self.out / "pid.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.rename(self.out / "pid")
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("the test did not kill this worker")


def make_config(tmp_path, name, extra=""):
    path = tmp_path / f"{name}.yaml"
    # a checkpoint every 4 steps however short the run (the kill test needs one on disk early)
    path.write_text(tiny_config_yaml(tmp_path, name, NO_CACHE + extra).replace(
        "checkpoint_every: 4", "checkpoint_every: 4\n  checkpoint_interval_s: 0"))
    return load_config(path)


def job_results(run_dir):
    """Every job's result.json without its wall time, and its weights' bytes."""
    out = {}
    for job in sorted((run_dir / "jobs").iterdir()):
        result = json.loads((job / "result.json").read_text())
        result.pop("wall_time_s")
        out[job.name] = (result, (job / "best.safetensors").read_bytes(), (job / "last.safetensors").read_bytes())
    return out


def comparable_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for k in ("wall_time_s", "started", "run_id"):
        summary.pop(k)
    for r in summary["results"].values():
        r.pop("wall_time_s")
    return summary


def test_ray_run_equals_the_sequential_run_bit_for_bit(tmp_path, cluster):
    seq_dir, _ = run(make_config(tmp_path, "seq"), reporter=Reporter(quiet=True), report=False)
    ray_dir, _ = run(make_config(tmp_path, "ray", "executor: {name: ray, workers: 2}"),
                     reporter=Reporter(quiet=True), report=False)
    seq, par = job_results(seq_dir), job_results(ray_dir)
    assert sorted(seq) == ["equal", "static", "stl__g0_t0", "stl__g0_t1", "stl__u0"]
    assert seq == par
    assert (seq_dir / "metrics.jsonl").read_bytes() == (ray_dir / "metrics.jsonl").read_bytes()
    assert comparable_summary(seq_dir) == comparable_summary(ray_dir)
    assert load_config(ray_dir / "config.yaml").executor.name == "ray"


def test_a_killed_worker_is_replaced_and_its_job_resumes_from_its_checkpoint(tmp_path, cluster):
    reference, _ = run(make_config(tmp_path, "reference"), reporter=Reporter(quiet=True), report=False)
    config = make_config(tmp_path, "killed", "executor: {name: ray, workers: 2, max_retries: 2}")
    run_dir = tmp_path / "killed"
    job_dir = run_dir / "jobs" / "equal"
    out = tmp_path / "marks"
    out.mkdir()
    at_step = 15  # 10 steps an epoch, a checkpoint every 4: the job has one on disk by then
    hook = PauseOnce("equal", at_step, job_dir, out)
    killed: dict[str, int] = {}

    def kill_when_paused() -> None:
        deadline = time.monotonic() + 120
        while not (out / "pid").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        killed["pid"] = int((out / "pid").read_text())
        killed["checkpoint_bytes"] = (job_dir / "last.safetensors").stat().st_size
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_paused)
    killer.start()
    try:
        run(config, reporter=Reporter(quiet=True), report=False, hooks=[hook])
    finally:
        killer.join()
    assert killed.get("pid"), "the job never reached its pause point"
    assert killed["checkpoint_bytes"] > 0
    firsts = [json.loads(p.read_text()) for p in sorted(out.glob("first-*.json"))]
    assert len(firsts) == 2, firsts  # the killed worker and the one that took over
    before = next(f for f in firsts if f["pid"] == killed["pid"])
    after = next(f for f in firsts if f["pid"] != killed["pid"])
    assert before["global_step"] == 0
    assert 0 < after["global_step"] <= at_step  # resumed from its checkpoint, not restarted from step 0
    got, want = job_results(run_dir), job_results(reference)
    assert got == want
    assert comparable_summary(run_dir) == comparable_summary(reference)




def test_relate_with_the_executor_option_equals_sequential(tmp_path, cluster):
    """``polytask relate --executor ray`` (in this process, so on this module's cluster and its warm workers) trains
    the K singles and K(K-1)/2 pairs as Ray tasks, logs each as it finishes, and gives the sequential matrix."""
    from typer.testing import CliRunner

    from polytask.cli import app
    from polytask.flows.relate import relate

    _, seq = relate(make_config(tmp_path, "seq", "relate: {estimators: [pairwise]}"), reporter=Reporter(quiet=True))
    path = tmp_path / "cli.yaml"
    path.write_text(tiny_config_yaml(tmp_path, "cli", NO_CACHE + "relate: {estimators: [pairwise]}"))
    r = CliRunner().invoke(app, ["relate", str(path), "--executor", "ray"])
    assert r.exit_code == 0, r.output
    assert "ray: 6 jobs" in r.output and "[pair/g0_t0+g0_t1] finished" in r.output
    par = json.loads((tmp_path / "cli" / "affinity_pairwise.json").read_text())
    assert par["matrix"] == seq["pairwise"].matrix.tolist()
    assert job_results(tmp_path / "seq") == job_results(tmp_path / "cli")
    assert load_config(tmp_path / "cli" / "config.yaml").executor.name == "ray"


def test_a_merge_experiments_fine_tunes_on_ray_equal_sequential(tmp_path, cluster):
    def experiment(name, executor):
        return ExperimentConfig.model_validate({
            "seed": 1, "suite": {"name": "digit-attributes"}, "tasks": ["even", "ge5"],
            "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
            "train": {"batch_size": 64, "checkpoint_every": 0}, "pretrain": {"epochs": 1, "fraction": 0.4},
            "finetune": {"epochs": 1}, "methods": ["task_arithmetic"], "data": {"n_examples": 32},
            "output": {"dir": str(tmp_path), "name": name}, "executor": executor})

    seq_dir, seq = run_merge_experiment(experiment("seq", "sequential"))
    ray_dir, par = run_merge_experiment(experiment("ray", "ray"))
    assert job_results(seq_dir) == job_results(ray_dir)
    assert sorted(p.name for p in (ray_dir / "jobs").iterdir()) == ["finetune__even", "finetune__ge5", "pretrain"]
    assert {k: r["tasks"] for k, r in seq["results"].items()} == {k: r["tasks"] for k, r in par["results"].items()}
    # the executor never changes results: the run directory may be finished with another one
    run_merge_experiment(experiment("ray", "sequential"))


def test_the_executor_section_validates_and_names_its_keys():
    assert Config.model_validate({"executor": "ray"}).executor.name == "ray"
    assert Config().executor.name == "sequential" and Config().executor.max_retries == 3
    with pytest.raises(ConfigError, match=r"executor\.name"):
        load_config(None, ["executor.name=dask"])
    with pytest.raises(ConfigError, match=r"executor\.workers"):
        load_config(None, ["executor.workers=-1"])
    assert ExperimentConfig.model_validate({"suite": {"name": "digit-attributes"}, "executor": "ray"}).executor.name \
        == "ray"
    cfg = load_config(None, ["executor=ray", "executor.workers=3"])
    assert (cfg.executor.name, cfg.executor.workers) == ("ray", 3)
    assert with_executor(cfg, "sequential").executor.workers == 3 and cfg.executor.name == "ray"
    assert with_executor(cfg, None) is cfg


def test_work_items_keep_the_first_of_each_job_id_in_order_and_workers_fill_the_cluster():
    a, b = Job("a", ("t",), Config().relate.method, "joint"), Job("b", ("t",), Config().relate.method, "joint")
    work = as_work([a, Work(b, split_seed=4), Work(a, split_seed=9)])
    assert [(w.job.id, w.split_seed) for w in work] == [("a", None), ("b", 4)]
    ex = Config().executor
    assert workers_of(ex, 8.0, 1) == 8 and workers_of(ex, 8.0, 3) == 2 and workers_of(ex, 1.0, 2) == 1
    assert workers_of(ex.model_copy(update={"workers": 5}), 2.0, 1) == 5


def test_a_job_that_fails_in_a_worker_raises_its_own_error(tmp_path, cluster):
    config = make_config(tmp_path, "diverged", "executor: ray\n").model_copy(deep=True)
    config.train.optimizer.lr = 1e30
    with pytest.raises(DivergenceError, match=r"job '[^']+' diverged: task"):
        run(config, reporter=Reporter(quiet=True), report=False)


def test_group_on_ray_equals_sequential(tmp_path, cluster):
    from polytask.flows.group import group

    extra = "group: {estimator: pairwise, budget: 2, seeds: [0], random_groupings: 1}\n"
    summaries = {}
    for name, executor in (("seq", "sequential"), ("ray", "ray")):
        config = make_config(tmp_path, name, extra + f"executor: {executor}\n")
        _, summary = group(config, reporter=Reporter(quiet=True))
        summary.pop("affinity_cost")
        summary["grouping"]["meta"].pop("seconds")  # the solver's time
        summaries[name] = summary
    assert summaries["seq"] == summaries["ray"]
    assert {"chosen", "all-in-one", "independent", "random-0"} <= set(summaries["ray"]["strategies"])
    assert job_results(tmp_path / "seq") == job_results(tmp_path / "ray")
