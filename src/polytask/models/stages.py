"""Stages of a sequential encoder: the layers between two points where an architecture taps or mixes the features
(cross-stitch units, MTAN attention modules).

The rule, read off the encoder's layer list: a stage ends after an activation or pooling layer, together with the
activation, pooling and dropout layers that directly follow it; the next layer of any other kind (a Linear or Conv,
a Flatten, a norm layer) starts the next stage. So ``mlp`` gives one stage per hidden layer
(``[Flatten, Linear, ReLU]``, ``[Linear, ReLU]``, ...) and ``lenet`` one per conv block
(``[Conv, MaxPool, ReLU]``, ...) and one for its dense layer (``[Flatten, Linear, ReLU]``): the points after each
pooling and fully connected layer where Misra et al. (2016) place their units, and the conv blocks whose outputs
Liu et al. (2019) attend over. Trailing layers after the last activation form the last stage's tail.

An encoder with categorical inputs (:class:`polytask.models.embedding.Embedded`: an ``embed`` front and a sequential
``backbone``) is split by its backbone's layers; the embedding lookup runs at the start of the first stage, so the
embeddings belong to the first stage (shared wherever the encoder is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from polytask.errors import ConfigError

_ACTIVATION_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.pooling")


@dataclass(frozen=True)
class Stage:
    """Layers ``start:stop`` of the encoder; ``channels``: the width of the stage's output along dim 1 (None when it
    cannot be read off the layers); ``spatial``: how many spatial dims follow the channels (0: a vector per sample,
    2: an image map; None when unknown)."""

    start: int
    stop: int
    channels: int | None
    spatial: int | None


def _ends_stage(layer: nn.Module) -> bool:
    """An activation or pooling layer (parameter-free kinds from ``torch.nn``; PReLU counts, attention does not)."""
    return type(layer).__module__ in _ACTIVATION_MODULES and not isinstance(layer, nn.MultiheadAttention)


def _trails(layer: nn.Module) -> bool:
    return _ends_stage(layer) or isinstance(layer, nn.modules.dropout._DropoutNd)


def _shape_after(layer: nn.Module, channels: int | None, spatial: int | None) -> tuple[int | None, int | None]:
    """(channels, spatial dims) of ``layer``'s output given its input's, as far as the layer's kind tells."""
    if isinstance(layer, nn.Linear):  # on a vector (or an input of unknown shape, taken as a vector)
        return (layer.out_features, 0) if spatial in (None, 0) else (None, None)
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels, len(layer.kernel_size)
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return layer.num_features, spatial
    if isinstance(layer, nn.Flatten):
        if layer.start_dim == 1 and layer.end_dim == -1:
            return (channels if spatial == 0 else None), 0
        return None, None
    if _trails(layer) or isinstance(layer, nn.Identity):
        return channels, spatial
    return None, None


def encoder_layers(encoder: nn.Module, architecture: str) -> tuple[nn.Sequential, Callable[[Tensor], Tensor] | None]:
    """The encoder's sequential layers and the front that runs before them (None: none): an ``nn.Sequential`` is its
    own layers; an encoder with an ``embed`` method and an ``nn.Sequential`` ``backbone`` (categorical inputs,
    ``Embedded``) is its backbone's layers after ``embed``. Another module is a ConfigError naming
    ``model.backbone``."""
    if isinstance(encoder, nn.Sequential) and len(encoder):
        return encoder, None
    inner, embed = getattr(encoder, "backbone", None), getattr(encoder, "embed", None)
    if isinstance(inner, nn.Sequential) and len(inner) and callable(embed):
        return inner, embed
    raise ConfigError(f"model.backbone: architecture {architecture!r} splits the encoder into stages and needs a "
                      f"non-empty nn.Sequential encoder (the mlp and lenet backbones are, with or without embedded "
                      f"categorical inputs); got {type(encoder).__name__}")


def split_stages(encoder: nn.Module, rep_dim: int, architecture: str) -> list[Stage]:
    """The stages of ``encoder``'s layers (see the module docstring for the rule and :func:`encoder_layers` for the
    encoders accepted). The last stage's output is the encoder's, ``rep_dim`` wide."""
    layers, _ = encoder_layers(encoder, architecture)
    bounds: list[tuple[int, int]] = []
    start, closed = 0, False
    for i, layer in enumerate(layers):
        if closed and not _trails(layer):
            bounds.append((start, i))
            start, closed = i, False
        closed = closed or _ends_stage(layer)
    bounds.append((start, len(layers)))
    stages: list[Stage] = []
    channels: int | None = None
    spatial: int | None = None
    for a, b in bounds:
        for layer in layers[a:b]:
            channels, spatial = _shape_after(layer, channels, spatial)
        stages.append(Stage(a, b, channels, spatial))
    last = stages[-1]
    if last.channels is None or last.spatial is None:  # the encoder's output is flat and rep_dim wide
        stages[-1] = Stage(last.start, last.stop, rep_dim, 0)
    return stages


def stage_layers(encoder: nn.Module, stage: Stage) -> nn.Sequential:
    """The encoder's layers of ``stage`` (without the front), as a new ``nn.Sequential`` numbered from 0."""
    layers, _ = encoder_layers(encoder, "")
    return nn.Sequential(*layers[stage.start:stage.stop])


def run_stage(encoder: nn.Module, stage: Stage, x: Tensor) -> Tensor:
    """``x`` through the encoder's layers of ``stage`` (the first stage starts with the encoder's front)."""
    layers, front = encoder_layers(encoder, "")
    if stage.start == 0 and front is not None:
        x = front(x)
    for i in range(stage.start, stage.stop):
        x = layers[i](x)
    return x


def stage_channels(stage: Stage, j: int, architecture: str, key: str) -> int:
    """The channel count of stage ``j``'s output, or a ConfigError naming ``key`` when the layers do not tell it."""
    if stage.channels is None:
        raise ConfigError(f"{key}: architecture {architecture!r} cannot tell the width of the encoder's stage {j} "
                          f"(layers {stage.start}:{stage.stop}): no Linear, Conv or norm layer gives it")
    return stage.channels
