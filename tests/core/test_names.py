"""The torch-free name index equals the registries, and a misspelt name is answered before torch loads."""

import subprocess
import sys

import pytest

from polytask.config import load_config
from polytask.errors import ConfigError
from polytask.names import NAMES


def test_index_equals_the_registries():
    from polytask.icl.baselines import BASELINES
    from polytask.icl.discrete import TOKEN_TASKS
    from polytask.icl.functions import FUNCTION_CLASSES
    from polytask.methods import load_all
    from polytask.models import ARCHITECTURES, BACKBONES
    from polytask.tasks import SUITES

    registries = {"suite": SUITES, "backbone": BACKBONES, "architecture": ARCHITECTURES, "method": load_all(),
                  "function_class": FUNCTION_CLASSES, "token_task": TOKEN_TASKS,
                  "baseline": BASELINES}
    assert {k: sorted(v) for k, v in NAMES.items()} == {k: r.names() for k, r in registries.items()}


@pytest.mark.parametrize(("override", "message"), [
    ("methods=[equal,pcgard]", r"methods\.1\.name: unknown method 'pcgard' \(did you mean 'pcgrad'\?\)"),
    ("suite.name=synthetc", r"suite\.name: unknown suite 'synthetc' \(did you mean 'synthetic'\?\)"),
    ("model.backbone=mpl", r"model\.backbone: unknown backbone 'mpl'"),
])
def test_misspelt_names_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_misspelt_method_is_answered_without_importing_torch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("methods: [equal, pcgard]\n")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "polytask.cli", "run", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean 'pcgrad'" in r.stderr
    assert not any(line.split("|")[-1].strip() == "torch" for line in r.stderr.splitlines())
