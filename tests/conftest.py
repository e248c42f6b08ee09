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


@pytest.fixture(scope="session")
def bert(tmp_path_factory):
    """A tiny randomly initialised BERT and its tokenizer as a local Hugging Face directory (tests/tiny_bert.py),
    written once per session; no test may change it."""
    from tiny_bert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert")


os.environ.setdefault("PYTHONHASHSEED", "0")
