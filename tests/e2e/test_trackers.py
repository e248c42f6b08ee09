"""Experiment trackers (polytask.tracking): a real tiny run with MLflow (a local file store) and TensorBoard on, read
back with MLflow's client and TensorBoard's EventAccumulator, against metrics.jsonl and summary.json; a run killed
(SIGKILL) at points where an epoch has been logged but its checkpoint has not landed logs each epoch once."""

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from polytask.config import load_config
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError
from polytask.flows.run import run

CLI = [sys.executable, "-m", "polytask.cli"]


def config_yaml(tmp: Path, name: str = "run") -> str:
    """Two tasks, two epochs of four steps, a [32] MLP: two single-task jobs and one uw job (its weights move)."""
    return f"""
seed: 3
suite:
  name: synthetic
  params: {{d: 8, groups: [2], unrelated: 0, conflicting_pairs: 0, n_train: 200, n_val: 60, n_test: 60}}
model: {{backbone: mlp, backbone_params: {{hidden: [32]}}}}
train: {{epochs: 2, batch_size: 50, checkpoint_every: 0, checkpoint_interval_s: 0, optimizer: {{name: adam, lr: 0.01}}}}
methods: [uw]
baselines: {{cache: false}}
output: {{dir: {tmp}, name: {name}}}
track:
  mlflow: {{uri: {tmp / "mlruns"}, experiment: tiny}}
  tensorboard: {{dir: {tmp / "tb"}}}
"""


@pytest.fixture(autouse=True)
def file_store(monkeypatch):
    """MLflow 3 opens a local file store only when asked to (the tracker sets this in the process it runs in)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def expected_epochs(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl as {job: {split/task/name: [(step, value)]}}."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k not in ("job", "epoch", "step", "split", "task"):
                out[r["job"]][f"{r['split']}/{r['task']}/{k}"].append((r["step"], v))
    return {j: {k: sorted(v) for k, v in d.items()} for j, d in out.items()}


def expected_summary(run_dir: Path) -> dict[str, float]:
    s = json.loads((run_dir / "summary.json").read_text())
    out = {}
    for label, r in s["results"].items():
        out |= {f"summary/{label}/{t}/{m}": v for t, scores in r["tasks"].items() for m, v in scores.items()}
        out[f"summary/{label}/delta_m"] = r["delta_m"]
        out |= {f"summary/{label}/{t}/delta_m": v for t, v in r["delta_m_per_task"].items()}
    return out | {f"summary/{label}/mean_rank": v for label, v in s["mean_rank"].items()}


def mlflow_runs(uri: Path, experiment: str = "tiny"):
    """Every MLflow run of the experiment by run name, with each metric's full history [(step, value)]."""
    client = MlflowClient(tracking_uri=uri.as_uri())
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        hist = {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                for k in r.data.metrics}
        assert r.info.run_name not in out, f"two MLflow runs are named {r.info.run_name!r}"
        out[r.info.run_name] = (r, hist)
    return client, out


def tensorboard_runs(root: Path) -> dict[str, dict[str, list[tuple[int, object]]]]:
    """Every TensorBoard sub-run under ``root``: {sub-run: {tag: [(step, value)]}} as EventAccumulator reads it."""
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        ea = EventAccumulator(str(d), size_guidance={TENSORS: 0, SCALARS: 0})
        ea.Reload()
        tags = {}
        for tag in ea.Tags()["tensors"]:
            vals = [(e.step, make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)]
            tags[tag] = sorted((s, a.item().decode() if a.dtype == object else float(a)) for s, a in vals)
        assert ea.Tags()["scalars"] == []  # every scalar is written in double precision
        out[d.name] = tags
    return out


def assert_logged_once(run_dir: Path, tmp: Path) -> None:
    """Each tracker holds exactly metrics.jsonl's values per job (each (name, step) once) and summary.json's
    numbers for the run."""
    epochs, summary = expected_epochs(run_dir), expected_summary(run_dir)
    assert set(epochs) == {"stl/g0_t0", "stl/g0_t1", "uw"}
    assert any(v != 1.0 for v in dict(epochs["uw"]["train/g0_t0/weight"]).values())  # the method's weights

    _, runs = mlflow_runs(tmp / "mlruns")
    assert set(runs) == {run_dir.name, *epochs}
    parent, parent_hist = runs[run_dir.name]
    assert parent_hist == {k: [(0, v)] for k, v in summary.items()}
    for job, metrics in epochs.items():
        r, hist = runs[job]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        assert hist == metrics, job

    tb = tensorboard_runs(tmp / "tb" / run_dir.name)
    assert set(tb) == {"_run", "stl__g0_t0", "stl__g0_t1", "uw"}
    for job, metrics in epochs.items():
        assert tb[job.replace("/", "__")] == metrics, job
    run_tags = tb["_run"]
    assert {k: v for k, v in run_tags.items() if not k.endswith("text_summary")} == {
        k: [(0, v)] for k, v in summary.items()}
    assert len(run_tags["config/text_summary"]) == 1 and len(run_tags["summary/text_summary"]) == 1
    assert "epochs: 2" in run_tags["config/text_summary"][0][1]
    assert json.loads(run_tags["summary/text_summary"][0][1].strip("`\n")) == json.loads(
        (run_dir / "summary.json").read_text())


def test_both_trackers_hold_the_run_as_metrics_jsonl_and_summary_json(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_yaml(tmp_path))
    run_dir, _ = run(load_config(cfg), reporter=Reporter(quiet=True), report=False)
    assert_logged_once(run_dir, tmp_path)

    client, runs = mlflow_runs(tmp_path / "mlruns")
    parent = runs["run"][0]
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["train.epochs"] == "2" and params["methods.0.name"] == "uw"
    assert params["model.backbone_params.hidden"] == "[32]" and params["suite.name"] == "synthetic"
    assert params["track.tensorboard.dir"] == str(tmp_path / "tb")
    job = runs["uw"][0].data.params
    assert job["job"] == "uw" and job["kind"] == "joint" and job["tasks"] == "g0_t0,g0_t1"
    assert job["method.name"] == "uw" and job["method.grad_mode"] == "params"
    got = Path(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert got.read_bytes() == (run_dir / "summary.json").read_bytes()
    got = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path / "dl")))
    assert got.read_bytes() == (run_dir / "config.yaml").read_bytes()


@pytest.mark.parametrize("kill_at", [
    "write:last.safetensors:1",  # first job: epoch 1 logged, its checkpoint not landed (the job starts again)
    "write:last.safetensors:6",  # uw's epoch 2 logged, its checkpoint not landed (resumes from epoch 1)
])
def test_killed_after_logging_an_epoch_logs_each_epoch_once(tmp_path, kill_at):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_yaml(tmp_path))
    env = dict(os.environ, POLYTASK_KILL_AT=kill_at)
    first = subprocess.run([*CLI, "run", str(cfg), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = tmp_path / "run"
    job = "stl/g0_t0" if kill_at.endswith(":1") else "uw"
    _, runs = mlflow_runs(tmp_path / "mlruns")
    logged_epochs = sorted({s for h in runs[job][1].values() for s, _ in h})
    assert logged_epochs == ([4] if job == "stl/g0_t0" else [4, 8])  # the epoch was logged before the kill
    run(resume=run_dir, reporter=Reporter(quiet=True), report=False)
    assert_logged_once(run_dir, tmp_path)


def test_a_missing_tracker_library_names_the_extra(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_yaml(tmp_path))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what Python does when a package is not installed
    with pytest.raises(ConfigError, match=r"track\.mlflow: needs mlflow.*pip install 'polytask\[track\]'"):
        run(load_config(cfg), reporter=Reporter(quiet=True), report=False)


def test_track_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_yaml(tmp_path))
    with pytest.raises(ConfigError, match=r"track\.mlflow\.uri"):
        load_config(cfg, ["track.mlflow={experiment: x}"])
    with pytest.raises(ConfigError, match=r"track\.wandb"):
        load_config(cfg, ["track.wandb={project: x}"])
    assert load_config(cfg, ["track={}"]).track.mlflow is None


def test_tracker_hooks_pickle_without_their_connections_and_log_to_the_same_sub_runs(tmp_path):
    """The Ray executor ships hooks to worker processes: a hook pickles without its MLflow client or open
    TensorBoard writer, and its copy logs to the same child run and sub-run directory."""
    import pickle

    from polytask.tracking import MLflowBackend, TensorBoardBackend, TrackerHook

    (tmp_path / "config.yaml").write_text("a: 1\n")
    mlflow = MLflowBackend(str(tmp_path / "mlruns"), "tiny", "key")
    mlflow.start("r", {"a": {"b": [1, 2], "c": [{"d": "e"}]}}, tmp_path / "config.yaml")
    tb = TensorBoardBackend(str(tmp_path / "tb"), "r")
    record = {"job": "j", "epoch": 1, "step": 3, "split": "val", "task": "t/1", "loss": 0.1 + 0.2, "acc": 1}
    for backend in (mlflow, tb):
        hook = TrackerHook(backend, "j", {"job": "j"})
        hook.init(None)  # opens the job's sub-run: a live client / an open writer
        copy = pickle.loads(pickle.dumps(hook))
        assert copy.backend.__dict__.get("_client") is None and copy.backend.__dict__.get("writers", {}) == {}
        copy.send([record])
        copy.backend.end_job("j")
        backend.end_job("j")
    _, runs = mlflow_runs(tmp_path / "mlruns")
    assert runs["r"][0].data.params == {"a.b": "[1, 2]", "a.c.0.d": "e"}
    assert runs["j"][1] == {"val/t_1/loss": [(3, 0.1 + 0.2)], "val/t_1/acc": [(3, 1.0)]}
    assert runs["j"][0].data.params == {"job": "j"}
    assert tensorboard_runs(tmp_path / "tb" / "r")["j"] == {"val/t_1/loss": [(3, 0.1 + 0.2)], "val/t_1/acc": [(3, 1.0)]}


def test_a_continual_study_logs_each_experience_and_its_metrics(tmp_path):
    """``polytask continual``: a sub-run per experience's job holding the job's history (as done.json keeps it),
    and the study's metrics per strategy and seed as the summary."""
    from polytask.continual.config import ContinualConfig
    from polytask.flows.continual import continual

    cfg = ContinualConfig.model_validate({
        "seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": "class"}},
        "model": {"backbone": "mlp", "backbone_params": {"hidden": [32]}},
        "train": {"epochs": 2, "batch_size": 64, "checkpoint_every": 0, "optimizer": {"name": "sgd", "lr": 0.1}},
        "strategies": ["naive"], "output": {"dir": str(tmp_path), "name": "cl"},
        "track": {"mlflow": {"uri": str(tmp_path / "mlruns"), "experiment": "tiny"},
                  "tensorboard": {"dir": str(tmp_path / "tb")}}})
    run_dir, summary = continual(cfg)
    _, runs = mlflow_runs(tmp_path / "mlruns")
    tb = tensorboard_runs(tmp_path / "tb" / "cl")
    jobs = sorted(p.name for p in (run_dir / "jobs" / "naive-s0").iterdir())
    assert jobs == ["e0", "e1", "e2", "e3", "e4"]
    for e in jobs:
        history = json.loads((run_dir / "jobs" / "naive-s0" / e / "done.json").read_text())["history"]
        want: dict[str, list] = defaultdict(list)
        for r in history:
            for k, v in r.items():
                if k not in ("job", "epoch", "step", "split", "task"):
                    want[f"{r['split']}/{r['task']}/{k}"].append((r["step"], v))
        assert {r["epoch"] for r in history} == {1, 2} and want
        assert runs[f"naive-s0/{e}"][1] == want and runs[f"naive-s0/{e}"][0].info.status == "FINISHED"
        assert tb[f"naive-s0__{e}"] == want
    metrics = summary["results"]["naive"][0]["metrics"]
    expected = {f"summary/naive/s0/{m}": [(0, v)] for m, v in metrics.items() if v is not None}
    assert "summary/naive/s0/forgetting" in expected
    assert runs["cl"][1] == expected
    assert {k: v for k, v in tb["_run"].items() if not k.endswith("text_summary")} == expected


@pytest.mark.parametrize("flow", ["relate", "group", "advise"])
def test_flows_that_do_not_track_refuse_a_track_section(tmp_path, flow):
    """relate, group and the advise flow log to no tracker: a track section is refused with its key named, not
    dropped silently."""
    import polytask

    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_yaml(tmp_path))
    config = load_config(cfg, ["flow=advise"] if flow == "advise" else [])
    call = polytask.run if flow == "advise" else getattr(polytask, flow)
    with pytest.raises(ConfigError, match=rf"track: .*{flow}.* does not log to trackers"):
        call(config, reporter=Reporter(quiet=True))
