"""``polytask continual CONFIG.yaml``: a stream, strategies and seeds, the model and training of each experience.

A command of its own rather than a ``regime:`` key of the joint experiment: its inputs (a stream of experiences,
strategies) and its results (an accuracy matrix per strategy and seed) share nothing with a comparison of joint
methods but the model and training sections, which it reuses.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import Field, field_validator

from polytask.config import (
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    Seed,
    TrackConfig,
    TrainConfig,
    _Strict,
    read_yaml,
)
from polytask.errors import ConfigError
from polytask.registry import validate_model


class StreamConfig(_Strict):
    """``stream:`` a registered stream and its parameters (see ``polytask continual --list``)."""

    name: str = Field("split-digits", description="a registered stream")
    params: dict[str, Any] = Field(default_factory=dict)


class StrategyConfig(_Strict):
    """One entry of ``strategies:``: a registered strategy, its parameters and its name in results."""

    name: str = Field(description="a registered strategy")
    params: dict[str, Any] = Field(default_factory=dict)
    label: str = Field("", description="name in results; defaults to the strategy name")

    def model_post_init(self, __context: Any) -> None:
        if not self.label:
            self.label = self.name


def _train_default() -> TrainConfig:
    return TrainConfig(epochs=5, batch_size=32, optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9))


class ContinualConfig(_Strict):
    """A continual-learning study: every strategy on the stream, for every seed; each experience trains
    ``train.epochs`` epochs from the weights the previous one left, with a fresh optimiser (as Avalanche does)."""

    seeds: list[Seed] = Field([0], min_length=1, description="seeds of the model, the data order and the stream")
    stream: StreamConfig = Field(default_factory=StreamConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(backbone_params={"hidden": [256, 256]}))
    train: TrainConfig = Field(default_factory=_train_default, description="per experience")
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="equal"),
                                 description="the joint method of an experience with several tasks")
    strategies: list[StrategyConfig] = Field(default_factory=lambda: [StrategyConfig(name="naive")], min_length=1)
    output: OutputConfig = Field(default_factory=OutputConfig)
    track: TrackConfig = Field(default_factory=TrackConfig, description="experiment trackers (off by default)")

    @field_validator("strategies", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v


def check_continual(config: ContinualConfig) -> ContinualConfig:
    """Validate the names and parameters that depend on registries (stream, strategies, model, method)."""
    from polytask.continual import STRATEGIES, STREAMS
    from polytask.methods import load_all
    from polytask.models import ARCHITECTURES, BACKBONES

    STREAMS.params_for(config.stream.name, config.stream.params, "stream.params")
    for i, s in enumerate(config.strategies):
        STRATEGIES.params_for(s.name, s.params, f"strategies.{i}.params")
    BACKBONES.params_for(config.model.backbone, config.model.backbone_params, "model.backbone_params")
    ARCHITECTURES.params_for(config.model.architecture, config.model.architecture_params, "model.architecture_params")
    load_all().params_for(config.method.name, config.method.params, "method.params")
    labels = [s.label for s in config.strategies]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"strategies: label {dup[0]!r} is used twice; give each a distinct 'label'")
    return config


def load_continual_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> ContinualConfig:
    """Read and validate a continual config (YAML), with ``--set`` overrides."""
    config = validate_model(ContinualConfig, read_yaml(path, overrides))
    assert isinstance(config, ContinualConfig)
    return check_continual(config)


def dump_continual_config(config: ContinualConfig) -> str:
    """The resolved configuration as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
