import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Single-task result cache in a per-test folder, never the user's."""
    monkeypatch.setenv("POLYTASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("POLYTASK_KILL_AT", raising=False)
    yield


os.environ.setdefault("PYTHONHASHSEED", "0")
