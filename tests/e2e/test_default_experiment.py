"""The default experiment (`polytask run`, no config) end to end, reduced in size: affinity, grouping, plans
trained with the methods, and a verdict that the console, summary.json and report.html all lead with."""

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "polytask.cli"]


def test_default_experiment_ends_with_a_verdict(tmp_path):
    r = subprocess.run([*CLI, "run", "--quiet", "--set", "train.epochs=4", "--set", "suite.params.n_test=200",
                        "--set", f"output.dir={tmp_path}", "--set", "output.name=first"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    run_dir = tmp_path / "first"
    assert lines[-2].startswith("verdict: ") and lines[-1] == f"report: {run_dir / 'report.html'}"

    summary = json.loads((run_dir / "summary.json").read_text())
    v = summary["verdict"]
    assert summary["flow"] == "advise" and summary["reference"] == "independent"
    plans = set(summary["results"])
    assert {"chosen", "all-in-one", "independent", "random-0", "chosen + uw", "chosen + pcgrad"} == plans
    assert v["plan"] in plans and set(v["total_val_loss"]) == plans
    assert v["total_val_loss"][v["plan"]] == min(v["total_val_loss"].values())
    assert lines[-2] == f"verdict: {v['text']}"
    tasks = {t["name"] for t in summary["suite"]["tasks"]}
    named = [t for n in v["networks"] for t in n["serves"]] + [k["task"] for k in v["alone"]]
    assert sorted(named) == sorted(tasks)  # every task is served once by the recommended plan
    assert summary["affinity"]["estimator"] == "grad_cosine" and summary["affinity"]["cost"]["wall_time_s"] > 0
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["strategies"]["chosen"]["groups"] == summary["results"]["chosen"]["groups"]

    page = (run_dir / "report.html").read_text()
    assert page.index("class='verdict'") < page.index("<h2>Results</h2>") < page.index("<h2>Task relations</h2>")
