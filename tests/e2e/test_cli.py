"""The `polytask` command end to end, in real subprocesses."""

import json
import subprocess
import sys

from helpers import tiny_config_yaml

CLI = [sys.executable, "-m", "polytask.cli"]


def polytask(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def test_run_writes_summary_report_and_table(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "r1"))
    r = polytask("run", str(cfg), "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r1"
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["results"]) == ["stl", "equal", "static"]
    assert summary["results"]["stl"]["delta_m"] == 0.0
    assert summary["reference"] == "stl" and set(summary["mean_rank"]) == {"stl", "equal", "static"}
    for name in ("equal", "static"):
        assert set(summary["results"][name]["tasks"]) == {"g0_t0", "g0_t1", "u0"}
    assert "Δm%" in r.stdout and "static" in r.stdout and str(run) in r.stdout
    assert "epoch 2/2" in r.stdout  # not a terminal: plain progress lines
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {rec["split"] for rec in records} == {"train", "val", "test"}
    assert {rec["job"] for rec in records} == {"stl/g0_t0", "stl/g0_t1", "stl/u0", "equal", "static"}
    assert max(rec["epoch"] for rec in records) == 2
    html = (run / "report.html").read_text()
    assert "<svg" in html and "static" in html
    assert "epochs: 2" in (run / "config.yaml").read_text()

    # the report command rewrites it from the result files alone
    out = tmp_path / "again.html"
    r = polytask("report", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == html


def test_single_task_results_are_cached_across_runs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "a", "methods: [equal]"))
    assert polytask("run", str(cfg)).returncode == 0
    cfg.write_text(tiny_config_yaml(tmp_path, "b", "methods: [equal]"))
    r = polytask("run", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("reused from cache") == 3
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["results"]["stl"]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["results"]["stl"]
    assert a["tasks"] == b["tasks"]
    # a different training budget is a different baseline
    cfg.write_text(tiny_config_yaml(tmp_path, "c", "methods: [equal]"))
    r = polytask("run", str(cfg), "--set", "train.epochs=1")
    assert "reused from cache" not in r.stdout


def test_config_error_is_one_line_and_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    r = polytask("run", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown key 'train.epoch' (did you mean 'epochs'?)"
    r = polytask("--debug", "run", str(cfg))
    assert r.returncode == 2 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_existing_run_dir_is_not_overwritten(tmp_path):
    (tmp_path / "r" ).mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, "r"))
    r = polytask("run", str(cfg))
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr
    assert (tmp_path / "r" / "keep.txt").read_text() == "x"


def test_listings():
    r = polytask("suites")
    assert r.returncode == 0
    for name in ("multidigits", "digit-attributes", "synthetic", "multimnist", "table"):
        assert f"{name}:" in r.stdout
    assert "left (classification, 10)" in r.stdout
    r = polytask("methods")
    assert r.returncode == 0 and "equal" in r.stdout and "paper:" in r.stdout


def test_report_of_missing_run_is_an_error(tmp_path):
    r = polytask("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
