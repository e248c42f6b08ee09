"""Checkpoint trees round-trip exactly through safetensors, and never unpickle."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polytask.engine import checkpoint
from polytask.engine.loop import rng_state, set_rng_state
from polytask.errors import CheckpointError

leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=False),
                   st.text(max_size=5))
trees = st.recursive(leaves, lambda c: st.one_of(
    st.lists(c, max_size=3), st.tuples(c, c),
    st.dictionaries(st.text(max_size=4), c, max_size=3),
    st.dictionaries(st.integers(0, 9), c, max_size=3)), max_leaves=12)


@given(trees)
def test_tree_round_trip(tree):
    assert checkpoint._decode(*_via_bytes(tree)) == tree


def _via_bytes(tree):
    tensors = {}
    skel = checkpoint._encode(tree, tensors)
    return skel, tensors


def test_optimizer_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random()
    np.random.rand()
    path = checkpoint.save(tmp_path / "c.safetensors", {"opt": opt.state_dict(), "rng": rng_state()})
    loaded = checkpoint.load(path)
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(loaded["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expect = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expect[0]) and np.random.rand() == expect[1] and random.random() == expect[2]


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors is unreadable"):
        checkpoint.load(bad)
    good = checkpoint.save(tmp_path / "t.safetensors", {"x": torch.ones(1000)})
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors"):
        checkpoint.load(truncated)
