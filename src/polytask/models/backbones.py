"""Shared encoders. A backbone maps an input of ``input_shape`` to a flat representation of ``out_dim``."""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from polytask.errors import ConfigError
from polytask.registry import Registry

Backbone = Callable[..., tuple[nn.Module, int]]
BACKBONES: Registry[Backbone] = Registry("backbone")


class MLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = Field([512, 256], description="hidden widths; the last is the representation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")


class LeNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: list[int] = Field([10, 20], min_length=1, description="channels of the 5x5 conv + 2x2 pool blocks")
    hidden: int = Field(64, ge=1, description="width of the fully connected representation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the representation layer")


def _mlp_layers(in_dim: int, widths: list[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_dim, w), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = w
    return layers


@BACKBONES.register("mlp", params=MLPParams, summary="Linear+ReLU layers (inputs of several axes flattened first)")
def mlp(params: MLPParams, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """``Linear``+``ReLU`` (+``Dropout``) per hidden width; a ``Flatten`` first only for inputs of more than one axis
    (on vectors it would be a no-op module call in every forward)."""
    in_dim = math.prod(input_shape)
    front: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
    return nn.Sequential(*front, *_mlp_layers(in_dim, params.hidden, params.dropout)), \
        params.hidden[-1] if params.hidden else in_dim


@BACKBONES.register("lenet", params=LeNetParams, summary="LeNet-style CNN: 5x5 conv + pool blocks, a dense layer")
def lenet(params: LeNetParams, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    if len(input_shape) == 2:  # (H, W) images get a channel axis
        layers.append(nn.Unflatten(1, (1, input_shape[0])))
        input_shape = (1, *input_shape)
    if len(input_shape) != 3:
        raise ConfigError(f"model.backbone: lenet needs image inputs (C, H, W), got shape {input_shape}")
    c, h, w = input_shape
    for out_c in params.channels:
        if min(h, w) < 2:
            raise ConfigError(f"model.backbone: input {input_shape} is too small for {len(params.channels)} blocks")
        layers += [nn.Conv2d(c, out_c, 5, padding=2), nn.MaxPool2d(2), nn.ReLU()]
        c, h, w = out_c, h // 2, w // 2
    layers += [nn.Flatten()]
    if params.dropout:
        layers.append(nn.Dropout(params.dropout))
    layers += [nn.Linear(c * h * w, params.hidden), nn.ReLU()]
    return nn.Sequential(*layers), params.hidden


def build_backbone(name: str, params: dict | BaseModel, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """Build backbone ``name`` for inputs of ``input_shape``; returns (module, representation width)."""
    return BACKBONES.build(name, params, input_shape, where="model.backbone_params")
