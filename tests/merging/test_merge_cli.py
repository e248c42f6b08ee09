"""`polytask merge` end to end, in real subprocesses, on checkpoints built in tmp_path."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from polytask.errors import ConfigError
from polytask.merging import load_merge_config, merge_state_dicts

CLI = [sys.executable, "-m", "polytask.cli"]


def polytask(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_merge_checkpoints_from_yaml(make_family, tmp_path):
    base_path, paths, base, models = make_family(3, "sharded")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""
method: ties
params: {{density: 0.5, lambda: 0.8}}
base: {base_path.name}
models:
  - {paths[0].name}
  - {{path: {paths[1].name}, weight: 0.5}}
  - {{path: {paths[2].name}, params: {{density: 0.3}}}}
output: {{path: merged, shard_size: 300B}}
options: {{check_finite: true}}
""")
    r = polytask("merge", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "merged 4 tensors (1 copied from the base) with ties" in r.stdout
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for shard in set(index["weight_map"].values()):
        got.update(load_file(out / shard))
    want = merge_state_dicts("ties", base, models, {"density": 0.5, "lambda": 0.8}, [1, 0.5, 1],
                             [{}, {}, {"density": 0.3}])
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_unknown_keys_and_bad_values_are_errors_naming_the_key(make_family, tmp_path):
    base_path, paths, *_ = make_family(1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"methd: ties\nbase: {base_path}\nmodels: [{paths[0]}]\noutput: {{path: {tmp_path / 'o'}}}\n")
    r = polytask("merge", str(cfg))  # the CLI prints the message, no traceback, exit code 2
    assert r.returncode == 2 and "unknown key 'methd' (did you mean 'method'?)" in r.stderr
    assert "Traceback" not in r.stderr
    cfg.write_text(f"method: ties\nparams: {{densty: 0.2}}\nbase: {base_path}\nmodels: [{paths[0]}]\n"
                   f"output: {{path: {tmp_path / 'o'}}}\n")
    cases = [
        ([], "unknown key 'params.densty' (did you mean 'density'?)"),
        (["params={density: 2}"], "params.density"),
        (["params={}", "method=tie"], "unknown merge method 'tie' (did you mean 'ties'?)"),
        (["params={}", "method=fisher"], "data-driven"),
        (["params={}", "models.0={path: x, wieght: 2}"], "unknown key 'models.0.wieght' (did you mean 'weight'?)"),
        (["params={}", "models.0={path: x, params: {density: 0.5}}", "method=task_arithmetic"],
         "'density' cannot be set per model"),
        (["params={}", "options={prefech: 0}"], "unknown key 'options.prefech' (did you mean 'prefetch'?)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            load_merge_config(cfg, overrides)
        assert message in str(e.value), (overrides, str(e.value))
    assert not (tmp_path / "o").exists()


def test_merge_list_shows_methods_with_papers_and_parameters():
    r = polytask("merge", "--list")
    assert r.returncode == 0
    for name in ("task_arithmetic", "ties", "dare", "breadcrumbs", "metagpt", "lwptv", "fisher", "regmean",
                 "adamerging", "divmerge"):
        assert name in r.stdout
    assert "Yadav et al. 2023" in r.stdout and "drop_rate (default 0.9)" in r.stdout


def test_merge_experiment_on_a_suite(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
seed: 1
suite: {{name: digit-attributes}}
tasks: [even, ge5, mod3]
model: {{backbone: mlp, backbone_params: {{hidden: [32, 16]}}}}
train: {{batch_size: 64, checkpoint_every: 0, optimizer: {{lr: 0.005}}}}
pretrain: {{epochs: 1, fraction: 0.4}}
finetune: {{epochs: 1}}
methods:
  - {{name: task_arithmetic, grid: {{lambda: [0.3, 1.0]}}}}
  - {{name: ties, params: {{density: 0.5}}}}
  - {{name: fisher, params: {{n_examples: 32}}}}
  - {{name: adamerging, params: {{steps: 3, n_examples: 32}}}}
data: {{n_examples: 64}}
output: {{dir: {tmp_path}, name: exp}}
""")
    r = polytask("merge", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "exp"
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["results"]) == ["finetuned", "pretrained", "task_arithmetic", "ties", "fisher", "adamerging"]
    assert summary["results"]["finetuned"]["mean_normalized"] == 1.0
    assert summary["results"]["task_arithmetic"]["params"]["lambda"] in (0.3, 1.0)
    for r_ in summary["results"].values():
        assert set(r_["tasks"]) == {"even", "ge5", "mod3"}
        assert all(0 <= v["accuracy"] <= 1 for v in r_["tasks"].values())
    html = (run / "report.html").read_text()
    assert "<table" in html and "adamerging" in html and "http" not in html
    assert "mean norm." in r.stdout and "fisher" in r.stdout
    for job in ("pretrain", "finetune__even", "finetune__ge5", "finetune__mod3"):
        assert (run / "jobs" / job / "best.safetensors").is_file()
