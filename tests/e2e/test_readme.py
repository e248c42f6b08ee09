"""The README cannot rot: its first block is what CI runs, and its shell and Python tour blocks run as written
(in a copy of the examples folder, with a few `--set` overrides that shrink training where a command as written
would take minutes)."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CLI = [sys.executable, "-m", "polytask.cli"]
# command prefix -> overrides that keep the suite fast (what they change is training length, never the command)
SHRINK = {
    "polytask relate examples/synthetic_groups.yaml": ["--set", "relate.estimators=[lookahead,grad_cosine]",
                                                       "--set", "train.epochs=2", "--set", "group.seeds=[0]",
                                                       "--set", "group.random_groupings=1"],
    "polytask run examples/recommender.yaml": ["--set", "train.epochs=1", "--set", "suite.params.n_train=1000"],
    "polytask icl examples/icl-linear.yaml": ["--set", "train.epochs=1", "--set", "train.steps=5",
                                              "--set", "eval.prompts=32"],
}


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands():
    for block in blocks("bash")[1:]:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("polytask"):
                yield line


def test_first_block_sets_up_runs_the_default_and_is_what_ci_tests():
    first = [line.split("#")[0].strip() for line in blocks("bash")[0].strip().splitlines()]
    assert first[0] == "./scripts/setup && .venv/bin/polytask run"
    assert first[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_tour_commands_run_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    ran = []
    for line in commands():
        args = shlex.split(line)[1:]
        extra = next((v for k, v in SHRINK.items() if line.startswith(k)), [])
        r = subprocess.run([*CLI, *args, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README command failed: {line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        ran.append(line)
    assert any(c.startswith("polytask run examples/") for c in ran) and any("group --resume" in c for c in ran)
    assert (tmp_path / "runs" / "compare" / "report.html").exists()
    assert (tmp_path / "runs" / "synthetic-groups" / "groups.json").exists()

    for code in blocks("python"):
        if "load_config(" in code and "merge" not in code:
            r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "compare-py" / "summary.json").exists()
