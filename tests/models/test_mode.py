"""set_training / evaluating: the flags nn.Module.train sets, on every tree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polytask.models.mode import evaluating, set_training


class Frozen(nn.Module):
    """Stays in eval mode whatever it is told (a frozen encoder's override)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)


LEAVES = [lambda: nn.Linear(2, 2), nn.ReLU, lambda: nn.Dropout(0.5), Frozen]


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> nn.Module:
    if depth >= 3 or draw(st.booleans()):
        return draw(st.sampled_from(LEAVES))()
    children = [draw(trees(depth + 1)) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        return nn.Sequential(*children)
    box = nn.ModuleDict({f"m{i}": c for i, c in enumerate(children)})
    if draw(st.booleans()):
        box.register_module("empty", None)  # a slot registered as None is skipped, as train() skips it
    return box


def flags(m: nn.Module) -> list[bool]:
    return [x.training for x in m.modules()]


@settings(max_examples=60, deadline=None)
@given(tree=trees(), start=st.lists(st.booleans(), min_size=1, max_size=40), mode=st.booleans())
def test_set_training_leaves_the_flags_train_leaves(tree, start, mode):
    mods = list(tree.modules())
    for m, f in zip(mods, start * len(mods), strict=False):  # any mix of modes to start from
        m.training = f
    want = [(m, m.training) for m in mods]
    tree.train(mode)
    expected = flags(tree)
    for m, f in want:
        m.training = f
    assert set_training(tree, mode) is tree
    assert flags(tree) == expected


@settings(max_examples=40, deadline=None)
@given(tree=trees(), was=st.booleans())
def test_evaluating_is_eval_then_the_former_mode_also_after_an_error(tree, was):
    tree.train(was)
    tree.eval()
    during = flags(tree)
    tree.train(was)
    after = flags(tree)
    with evaluating(tree) as m:
        assert m is tree and flags(tree) == during
    assert flags(tree) == after
    with pytest.raises(ZeroDivisionError), evaluating(tree):
        assert flags(tree) == during
        _ = 1 / 0
    assert flags(tree) == after


def test_a_mlp_evaluates_without_dropout_and_trains_with_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9))
    x = torch.ones(8, 4)
    with evaluating(model), torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout draw in eval mode
    assert model.training and model[1].training
