"""`polytask icl` end to end in real subprocesses: train, evaluate against the baselines, report; SIGKILL mid-run
and --resume gives the same weights bytes and the same results as a run never stopped; bad configs are named."""

import json
import os
import subprocess
import sys

from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import assert_well_formed
from polytask.cli import app
from polytask.flows.icl import icl, load_icl_config

CONFIG = """
families:
  - {name: linear_regression, params: {dim: 3}, label: linear}
  - {name: decision_tree, params: {dim: 3, depth: 1}, label: tree}
model: {n_embd: 32, n_layer: 1, n_head: 2}
curriculum:
  points: {start: 4, end: 8, inc: 2, interval: 3}
  dims: {start: 2, end: 3, inc: 1, interval: 3}
method: {name: famo}
train: {epochs: 2, steps: 6, batch_size: 8, checkpoint_every: 2}
eval: {prompts: 16, ood: [{name: scaled, factor: 2.0}, orthant]}
seed: 1
"""


def polytask(*args, env=None):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "POLYTASK_KILL_AT" or env}
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_icl_trains_evaluates_reports_and_resumes_exactly_after_sigkill(tmp_path):
    cfg = tmp_path / "icl.yaml"
    cfg.write_text(CONFIG)
    # the uninterrupted run in this process (the flow the command calls), the killed and resumed one by the command
    run, _ = icl(load_icl_config(cfg, [f"output.dir={tmp_path}", "output.name=whole"]))
    results = json.loads((run / "results.json").read_text())
    assert results["kind"] == "icl" and results["steps"] == 12 and results["families"] == ["linear", "tree"]
    lin = results["eval"]["linear"]
    assert set(lin) == {"normaliser", "standard", "scaled_x2", "orthant"}
    assert {"model", "least_squares", "knn", "averaging"} <= set(lin["standard"])
    assert "decision_tree" in results["eval"]["tree"]["standard"]  # the tree learner is the trees' baseline
    assert len(lin["standard"]["model"]["mean"]) == 8
    assert lin["standard"]["least_squares"]["mean"][-1] < 1e-6  # 7 noiseless examples in 3 dimensions
    page = (run / "report.html").read_text()
    assert_well_formed(page)
    assert page.count("<svg") == 2 * 3

    # killed after global step 9 (epoch 2, after the step-8 checkpoint), then resumed
    killed = polytask("icl", str(cfg), "--quiet", "--set", f"output.dir={tmp_path}", "--set", "output.name=killed",
                      env={"POLYTASK_KILL_AT": "step:9"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "job" / "last.safetensors").is_file()
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = polytask("icl", "--resume", str(tmp_path / "killed"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run directory: {tmp_path / 'killed'}" in resumed.stdout and '"least_squares"' in resumed.stdout
    for name in ("last.safetensors", "best.safetensors"):
        assert (tmp_path / "killed" / "job" / name).read_bytes() == (run / "job" / name).read_bytes(), name
    again = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert again["eval"] == results["eval"] and again["history"] == results["history"]
    assert load_file(run / "job" / "best.safetensors")  # a readable safetensors file


def test_bad_configs_are_named_before_training(tmp_path):
    runner = CliRunner()
    cases = {
        "families: [linear_regression]\ntrian: {epochs: 1}\n": "unknown key 'trian' (did you mean 'train'?)",
        "families: [linear_regresion]\n": "families.0.name: unknown family 'linear_regresion'",
        "families: [{name: linear_regression, params: {dimm: 3}}]\n": "families.0.params.dimm",
        "families: [linear_regression, successor]\n": "separate runs",
        "families: [linear_regression, sparse_linear_regression]\nregime: {kind: single}\n": "regime.kind",
        "families: [linear_regression]\nmethod: {name: famoo}\n": "method.name: unknown method 'famoo'",
        "families: [linear_regression]\ncurriculum: {points: {start: 9, end: 4}}\n": "curriculum.points",
    }
    for i, (text, message) in enumerate(cases.items()):
        cfg = tmp_path / f"bad{i}.yaml"
        cfg.write_text(text + f"output: {{dir: {tmp_path}}}\n")
        out = runner.invoke(app, ["icl", str(cfg)])
        assert out.exit_code == 2, (text, out.output)
        assert message in out.output, (text, out.output)
    assert not list(tmp_path.glob("icl-*"))  # no run directory was opened


def test_a_task_pool_is_scored_on_seen_and_unseen_tasks(tmp_path):
    """Raventós et al.'s split: trained on a pool of 4 linear functions, the run scores the seen pool and fresh
    functions; the pool's posterior mean (the memorising learner) is near exact on the seen tasks only."""
    cfg = tmp_path / "pool.yaml"
    cfg.write_text("families: [{name: linear_regression, params: {dim: 3}, pool: 4, label: lin}]\n"
                   "model: {n_embd: 32, n_layer: 1, n_head: 2}\ncurriculum: {points: {end: 8}}\n"
                   "train: {epochs: 1, steps: 3, batch_size: 8}\neval: {prompts: 64, ood: []}\n"
                   f"output: {{dir: {tmp_path}, name: pool}}\n")
    _, results = icl(load_icl_config(cfg))
    lin = results["eval"]["lin"]
    assert set(lin) == {"normaliser", "standard", "unseen"}
    seen, unseen = lin["standard"]["pool_posterior"]["mean"], lin["unseen"]["pool_posterior"]["mean"]
    assert seen[-1] < 0.05 and unseen[-1] > 10 * seen[-1]
    assert lin["unseen"]["least_squares"]["mean"][-1] < 1e-6  # the generalising learner does not care
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"families: [{{name: successor, pool: 3}}]\noutput: {{dir: {tmp_path}}}\n")
    out = CliRunner().invoke(app, ["icl", str(bad)])
    assert out.exit_code == 2 and "families.0.pool" in out.output


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("families: [{name: linear_regression, labl: x}]\n")
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "polytask.cli", "icl", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown key 'families.0.labl' (did you mean 'label'?)" in out.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if "import time:" in line}
    assert "torch" not in imported and "polytask" in imported
