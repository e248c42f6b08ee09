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
    r = polytask("architectures")
    from polytask.models import ARCHITECTURES

    assert r.returncode == 0 and r.stdout.count("paper:") == len(ARCHITECTURES.names())
    for name in ARCHITECTURES.names():
        assert f"\n{name} " in "\n" + r.stdout, name


def test_report_of_missing_run_is_an_error(tmp_path):
    r = polytask("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- user data: cache, failed starts, locks


def write_table(path, labels_seed=None, n=240):
    """A CSV with three features, a learnable label ``y`` (or random labels), a regression column ``r``
    and a single-class column ``const``."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] > 0).astype(int) if labels_seed is None else np.random.default_rng(labels_seed).integers(0, 2, n)
    pd.DataFrame({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "y": y, "r": 3 * x[:, 1],
                  "const": np.ones(n, dtype=int)}).to_csv(path, index=False)
    return path


def table_config(tmp_path, name="t", targets=("y",), **train):
    from polytask.config import Config

    return Config.model_validate({
        "seed": 0,
        "suite": {"name": "table", "params": {"path": str(tmp_path / "data.csv"), "targets": list(targets),
                                              "features": ["f0", "f1", "f2"]}},
        "model": {"backbone_params": {"hidden": [8]}},
        "train": {"epochs": 1, "batch_size": 64, **train},
        "methods": ["equal"], "output": {"dir": str(tmp_path), "name": name}})


class Lines:
    """A Reporter stream that keeps the lines."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return False


def test_cache_key_changes_with_every_input_of_the_result(tmp_path, monkeypatch):
    """Data content (not the path), split seed, training seed, job, config parts, starting weights, the files a
    backbone parameter names and code version each change the single-task cache key; nothing else does."""
    import polytask
    from polytask.flows import runner as experiment
    from polytask.flows.jobs import Job
    from polytask.tasks import build_suite

    write_table(tmp_path / "data.csv")
    cfg = table_config(tmp_path)
    params = cfg.suite.params
    job = experiment.single_task_job("y")
    suite = build_suite("table", params, 0)
    key = experiment.result_cache_key(job, suite, cfg)
    assert experiment.result_cache_key(job, build_suite("table", params, 0), cfg) == key  # deterministic
    assert experiment.result_cache_key(job, suite, cfg.model_copy(update={"methods": []})) == key
    (tmp_path / "w.safetensors").write_bytes(b"v1")
    init = cfg.model.model_copy(update={"init_from": str(tmp_path / "w.safetensors")})
    with_init = cfg.model_copy(update={"model": init})
    init_key = experiment.result_cache_key(job, suite, with_init)
    keys = {"base": key, "init_from": init_key}
    (tmp_path / "w.safetensors").write_bytes(b"v2")  # same path, other weights
    keys["init_from content"] = experiment.result_cache_key(job, suite, with_init)
    keys["split seed"] = experiment.result_cache_key(job, build_suite("table", params, 1), cfg, split_seed=1)
    keys["split seed only"] = experiment.result_cache_key(job, suite, cfg, split_seed=1)
    keys["training seed"] = experiment.result_cache_key(job, suite, cfg.model_copy(update={"seed": 1}), split_seed=0)
    keys["job"] = experiment.result_cache_key(Job(f"s0/{job.id}", job.tasks, job.method, job.kind), suite, cfg)
    keys["train"] = experiment.result_cache_key(job, suite, table_config(tmp_path, epochs=2))
    keys["model"] = experiment.result_cache_key(job, suite, cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"backbone_params": {"hidden": [9]}})}))
    encoder = tmp_path / "encoder"  # a model directory named by the backbone (hf: path)
    encoder.mkdir()
    (encoder / "model.safetensors").write_bytes(b"w1")
    named = cfg.model.model_copy(update={"backbone_params": {"path": str(encoder)}})
    with_dir = cfg.model_copy(update={"model": named})
    keys["model dir"] = experiment.result_cache_key(job, suite, with_dir)
    (encoder / "model.safetensors").write_bytes(b"w2, other weights")  # the same path, other weights
    keys["model dir content"] = experiment.result_cache_key(job, suite, with_dir)
    monkeypatch.setattr(experiment, "code_version", lambda: "other code")
    keys["code"] = experiment.result_cache_key(job, suite, cfg)
    monkeypatch.undo()
    write_table(tmp_path / "data.csv", labels_seed=1)  # the same path, other labels
    keys["labels"] = experiment.result_cache_key(job, build_suite("table", params, 0), cfg)
    assert len(set(keys.values())) == len(keys), keys

    # the code version is a digest of the package's sources
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(polytask, "__file__", str(pkg / "__init__.py"))
    before = experiment.code_version.__wrapped__()
    (pkg / "a.py").write_text("x = 2\n")
    assert experiment.code_version.__wrapped__() != before


def test_cache_misses_when_the_csv_or_the_split_changes(tmp_path):
    """Overwriting the CSV with random labels, or drawing the split with another seed (``polytask group``
    trains its seeds on the run's split), trains the baseline again instead of reusing the cached one."""
    from polytask.engine.progress import Reporter
    from polytask.flows import runner as experiment
    from polytask.flows.jobs import Job
    from polytask.tasks import build_suite

    write_table(tmp_path / "data.csv")
    cfg = table_config(tmp_path, epochs=4, optimizer={"lr": 0.05})
    out = Lines()
    reporter = Reporter(out)
    job = Job("s0/stl/y", ("y",), experiment.single_task_job("y").method, "single_task")  # group's seed-0 job

    def result(run, suite, split_seed):
        return experiment.execute(job, suite, cfg, tmp_path / run, reporter, split_seed=split_seed)

    first = result("a", build_suite("table", cfg.suite.params, 0), 0)
    assert "reused from cache" not in out.text
    assert result("b", build_suite("table", cfg.suite.params, 0), 0)["test"] == first["test"]
    assert out.text.count("reused from cache") == 1
    result("c", build_suite("table", cfg.suite.params, 1), 1)  # a run with seed 1, group seed 0
    assert out.text.count("reused from cache") == 1
    write_table(tmp_path / "data.csv", labels_seed=1)
    random_labels = result("d", build_suite("table", cfg.suite.params, 0), 0)
    assert out.text.count("reused from cache") == 1
    assert random_labels["test"]["y"]["accuracy"] < first["test"]["y"]["accuracy"] - 0.2


def test_failed_start_does_not_block_the_fixed_run(tmp_path):
    """A run whose data fails to load leaves its directory (with the config, so a kill at any moment is
    resumable), and the same run with the config fixed starts in it; a run that trained is never replaced."""
    import pytest
    import yaml

    from polytask.engine.progress import Reporter
    from polytask.errors import ConfigError, DataError
    from polytask.flows.run import run

    write_table(tmp_path / "data.csv")
    quiet = Reporter(quiet=True)
    with pytest.raises(DataError, match="'const' has a single class"):
        run(table_config(tmp_path, targets=("const",)), reporter=quiet, report=False)
    saved = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert saved["suite"]["params"]["targets"] == ["const"]
    run_dir, summary = run(table_config(tmp_path, targets=("y", "r")), reporter=quiet, report=False)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["suite"]["params"]["targets"] == ["y", "r"]
    assert set(summary["results"]["stl"]["tasks"]) == {"y", "r"}
    with pytest.raises(ConfigError, match=r"already exists.*--resume"):
        run(table_config(tmp_path, targets=("y",)), reporter=quiet, report=False)


def test_second_process_on_a_run_directory_is_refused_with_the_holders_pid(tmp_path):
    import subprocess

    import pytest

    from polytask.engine.progress import Reporter
    from polytask.errors import RunLockedError
    from polytask.flows.run import run
    from polytask.flows.runner import close_run, open_run

    write_table(tmp_path / "data.csv")
    run_dir, _, _ = open_run(table_config(tmp_path), None)
    close_run(run_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom polytask.io import DirLock\nDirLock(sys.argv[1]).acquire()\n"
         "print('locked', flush=True)\nsys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        quiet = Reporter(quiet=True)
        with pytest.raises(RunLockedError, match=rf"{run_dir} is in use by process {holder.pid} "):
            run(resume=run_dir, reporter=quiet, report=False)
        with pytest.raises(RunLockedError, match=rf"process {holder.pid} "):  # nor restarted under it
            run(table_config(tmp_path), reporter=quiet, report=False)
    finally:
        holder.stdin.close()
        holder.wait()
    _, summary = run(resume=run_dir, reporter=quiet, report=False)  # the holder is gone: its lock with it
    assert "y" in summary["results"]["equal"]["tasks"]
