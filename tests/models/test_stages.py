"""The stage rule shared by cross-stitch and MTAN: a stage ends after an activation/pooling layer (with the
activation, pooling and dropout layers right after it); each stage's output width and kind are read off its layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.models.backbones import build_backbone
from polytask.models.stages import Stage, run_stage, split_stages


def test_mlp_gives_one_stage_per_hidden_layer():
    enc, width = build_backbone("mlp", {"hidden": [8, 5], "dropout": 0.1}, (6,))
    # Linear, ReLU, Dropout | Linear, ReLU, Dropout (vectors: no Flatten)
    assert split_stages(enc, width, "x") == [Stage(0, 3, 8, 0), Stage(3, 6, 5, 0)]
    enc, width = build_backbone("mlp", {"hidden": [8, 5], "dropout": 0.1}, (2, 3))
    # Flatten, Linear, ReLU, Dropout | Linear, ReLU, Dropout
    assert split_stages(enc, width, "x") == [Stage(0, 4, 8, 0), Stage(4, 7, 5, 0)]


def test_lenet_gives_one_stage_per_conv_block_and_one_for_the_dense_layer():
    enc, width = build_backbone("lenet", {"channels": [4, 6], "hidden": 8}, (1, 8, 8))
    # Conv, Pool, ReLU | Conv, Pool, ReLU | Flatten, Linear, ReLU
    assert split_stages(enc, width, "x") == [Stage(0, 3, 4, 2), Stage(3, 6, 6, 2), Stage(6, 9, 8, 0)]
    enc, width = build_backbone("lenet", {"channels": [4], "hidden": 8}, (8, 8))  # Unflatten first
    assert split_stages(enc, width, "x") == [Stage(0, 4, 4, 2), Stage(4, 7, 8, 0)]


def test_running_the_stages_in_turn_is_the_encoder():
    enc, width = build_backbone("lenet", {"channels": [4, 6], "hidden": 8}, (1, 8, 8))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    h = x
    for stage in split_stages(enc, width, "x"):
        h = run_stage(enc, stage, h)
    torch.testing.assert_close(h, enc(x), rtol=0, atol=0)


def test_layers_without_an_activation_between_them_stay_in_one_stage():
    enc = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Tanh(), nn.MaxPool1d(1), nn.Linear(2, 2))
    assert split_stages(enc, 2, "x") == [Stage(0, 4, 2, 0), Stage(4, 5, 2, 0)]


def test_a_module_that_is_not_sequential_is_refused_naming_the_backbone():
    with pytest.raises(ConfigError, match=r"model\.backbone: architecture 'x' .* nn\.Sequential.*got Linear"):
        split_stages(nn.Linear(3, 2), 2, "x")


class _Front(nn.Module):
    """An encoder shaped like ``Embedded``: an ``embed`` front (here a learned scale) before a sequential backbone."""

    def __init__(self, backbone: nn.Sequential) -> None:
        super().__init__()
        self.backbone, self.scale = backbone, nn.Parameter(torch.tensor(2.0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.embed(x))


def test_an_embedding_front_opens_the_first_stage():
    enc, width = build_backbone("mlp", {"hidden": [8, 5]}, (6,))
    front = _Front(enc)
    stages = split_stages(front, width, "x")
    assert stages == split_stages(enc, width, "x")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    h = x
    for stage in stages:
        h = run_stage(front, stage, h)
    torch.testing.assert_close(h, front(x), rtol=0, atol=0)
