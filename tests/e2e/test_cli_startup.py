"""The CLI answers quickly where it can: a bad config is reported before torch is imported; listings show every
parameter with its default (or 'required'); `--version`."""

import subprocess
import sys
from importlib.metadata import version

from pydantic import BaseModel, Field
from typer.testing import CliRunner

import polytask
from polytask.cli import app
from polytask.registry import describe_params


def polytask_cli(*args, importtime=False, **kw):
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "polytask.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def imported(stderr: str) -> set[str]:
    """Top-level modules named in `python -X importtime` output."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines() if "import time:" in line}


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: 0\ntrian: {epochs: 3}\n")
    for command in ("run", "relate", "group"):
        r = polytask_cli(command, str(cfg), importtime=True)
        assert r.returncode == 2
        assert "error: unknown key 'trian' (did you mean 'train'?)" in r.stderr
        assert "torch" not in imported(r.stderr), command


def test_an_empty_method_list_is_a_config_error(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("methods: []\n")
    r = polytask_cli("run", str(cfg), importtime=True, cwd=tmp_path)
    assert r.returncode == 2 and "error: methods:" in r.stderr and "at least 1" in r.stderr
    assert "torch" not in imported(r.stderr)
    assert list(tmp_path.iterdir()) == [cfg]  # no run directory


def test_version_is_the_installed_one():
    r = polytask_cli("--version", importtime=True)
    assert r.returncode == 0
    assert r.stdout.strip() == f"polytask {polytask.__version__}" == f"polytask {version('polytask')}"
    assert "torch" not in imported(r.stderr)


def test_describe_params_shows_defaults_required_and_aliases():
    class Params(BaseModel):
        weights: dict[str, float] = Field(description="per task")
        lambda_: float = Field(1.0, alias="lambda", description="scale")
        seeds: list[int] = Field(default_factory=lambda: [0, 1])
        quiet: bool = False

    assert describe_params(Params) == [
        "weights (required): per task",
        "lambda (default 1.0): scale",
        "seeds (default [0, 1])",
        "quiet (default False)",
    ]


def test_methods_listing_shows_each_methods_parameters():
    r = CliRunner().invoke(app, ["methods"])
    assert r.exit_code == 0
    assert "c (default 0.4): radius of the ball" in r.stdout  # cagrad
    assert "weights (required)" in r.stdout  # static
    assert "PydanticUndefined" not in r.stdout


def test_merge_list_says_required_not_pydantic_undefined():
    r = CliRunner().invoke(app, ["merge", "--list"])
    assert r.exit_code == 0, r.output
    assert "PydanticUndefined" not in r.stdout and "(default " in r.stdout
