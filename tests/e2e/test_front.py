"""`polytask front` end to end: two tiny finished runs, one front over their methods, the CLI in real subprocesses."""

import json
import shutil
import subprocess
import sys

from helpers import tiny_config_yaml
from polytask.config import load_config
from polytask.flows import Reporter
from polytask.flows.run import run

CLI = [sys.executable, "-m", "polytask.cli"]


def polytask(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def finished_run(tmp_path, name, methods):
    """A run finished by the run flow in this process (torch is loaded here already; only `front` needs the CLI)."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(tiny_config_yaml(tmp_path, name, f"methods: {methods}"))
    run_dir, _ = run(load_config(cfg, ["train.epochs=1"]), reporter=Reporter(quiet=True))
    return run_dir


def test_front_over_two_runs_prints_json_and_writes_the_page(tmp_path):
    a = finished_run(tmp_path, "a", "[equal, pcgrad]")
    b = finished_run(tmp_path, "b", "[uw]")  # same seed: single-task results come from the cache

    # each run's own report has a Pareto section only where it has two methods besides single-task
    assert "<h2>Pareto front</h2>" in (a / "report.html").read_text()
    assert "<h2>Pareto front</h2>" not in (b / "report.html").read_text()

    out = tmp_path / "out" / "front.html"
    r = polytask("front", str(a), str(b), "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    labels = ["a/stl", "a/equal", "a/pcgrad", "b/stl", "b/uw"]
    assert list(data["points"]) == labels
    assert data["tasks"] == ["g0_t0", "g0_t1", "u0"] and data["single_task"] == "a/stl"
    assert data["non_dominated"] and set(data["non_dominated"]) <= set(labels)
    assert data["hypervolume"] > 0 and len(data["reference_point"]) == 3
    assert data["report"] == str(out) and set(data["worse_than_single_task"]) == {"a/equal", "a/pcgrad", "b/uw"}
    page = out.read_text()
    assert page.count("<svg") == 3 and page.count("data-label=") == 3 * len(labels)  # 3 pairwise projections
    assert not list(out.parent.glob("*.tmp"))

    # a run with other tasks: the error names the run and the missing task
    c = tmp_path / "c"
    shutil.copytree(b, c)
    summary = json.loads((c / "summary.json").read_text())
    summary["run_id"] = "c"
    summary["suite"]["tasks"] = [t for t in summary["suite"]["tasks"] if t["name"] != "u0"]
    (c / "summary.json").write_text(json.dumps(summary))
    r = polytask("front", str(a), str(c))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: run 'c' has no task 'u0'"), r.stderr
    assert not (a / "front.html").exists()
