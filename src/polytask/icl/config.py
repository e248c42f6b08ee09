"""``polytask icl CONFIG.yaml``: task families, a small GPT-2, a training regime and a joint method, evaluation.

Validated strictly before any work starts (unknown keys and bad values name the key; family, method and baseline
names are checked against torch-free name lists first, their parameters against the registries in
:func:`check_icl`). Example: ``examples/icl-linear.yaml``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from polytask.config import MethodConfig, OptimizerConfig, OutputConfig, SchedulerConfig, Seed, _Strict, read_yaml
from polytask.errors import ConfigError
from polytask.registry import validate_model


class FamilyConfig(_Strict):
    """One entry of ``families:``: a registered function class or token task, its parameters and its name in results
    (``label``; defaults to the name; two entries of one class need distinct labels)."""

    name: str = Field(description="a registered function class or token task")
    params: dict[str, Any] = Field(default_factory=dict)
    label: str = Field("", description="name in results and in the model's outputs")
    pool: int = Field(0, ge=0, description="function classes: train on a fixed pool of this many functions "
                      "(Raventós et al. 2023's task diversity; evaluated on seen and unseen ones); 0: fresh ones")

    def model_post_init(self, __context: Any) -> None:
        if not self.label:
            self.label = self.name


class IclModelConfig(_Strict):
    """``model:`` the GPT-2 size (Garg et al.'s small model: 256 wide, 8 layers, 8 heads; a CPU run wants less)."""

    n_embd: int = Field(128, ge=1)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)


class ScheduleConfig(_Strict):
    """A curriculum variable (Garg et al.'s ``curriculum.py``): ``start``, + ``inc`` every ``interval`` steps, up to
    ``end``; ``start`` unset (or ``interval`` 0): always ``end``."""

    end: int = Field(ge=1)
    start: int | None = Field(None, ge=1)
    inc: int = Field(1, ge=1)
    interval: int = Field(0, ge=0, description="steps between increments (0: no curriculum)")

    @model_validator(mode="after")
    def _order(self) -> ScheduleConfig:
        if self.start is not None and self.start > self.end:
            raise ValueError(f"start {self.start} is above end {self.end}")
        return self


class CurriculumConfig(_Strict):
    """``curriculum:`` the number of points (demonstrations, for token tasks) and the input dimension over training
    steps (Garg et al.: +2 points and +1 dimension every 2000 steps)."""

    points: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(end=20))
    dims: ScheduleConfig | None = Field(None, description="function classes: active input coordinates")


class RegimeConfig(_Strict):
    """``regime:`` ``single`` (one family), ``mixture`` (every family every step, one loss each) or
    ``task_curriculum`` (families enter in listed order, one every ``enter_every`` steps)."""

    kind: Literal["single", "mixture", "task_curriculum"] = "mixture"
    enter_every: int = Field(0, ge=0, description="task_curriculum: steps between families entering")


class IclTrainConfig(_Strict):
    """``train:`` ``epochs`` x ``steps`` optimiser steps of ``batch_size`` fresh prompts per family; an epoch is a
    validation and checkpoint period."""

    epochs: int = Field(10, ge=1)
    steps: int = Field(100, ge=1, description="optimiser steps per epoch")
    batch_size: int = Field(64, ge=1, description="prompts per family and step")
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3))
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch)")
    threads: int = Field(1, ge=0, description="torch CPU threads (0: torch's default)")
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")


SHIFT_NAMES = ("standard", "scaled", "orthant", "random_orthant", "noisy_labels")


class ShiftConfig(_Strict):
    """One out-of-distribution evaluation (Garg et al. Sec. 4): ``scaled`` inputs (``factor``), ``orthant`` (context
    in one orthant, queries in the opposite), ``random_orthant``, ``noisy_labels`` (``std``)."""

    name: Literal["standard", "scaled", "orthant", "random_orthant", "noisy_labels"]
    factor: float = Field(2.0, gt=0, description="scaled: input scale")
    std: float = Field(0.5, ge=0, description="noisy_labels: label noise std")
    label: str = ""

    def model_post_init(self, __context: Any) -> None:
        if not self.label:
            self.label = {"scaled": f"scaled_x{self.factor:g}", "noisy_labels": f"noisy_labels_{self.std:g}"}.get(
                self.name, self.name)


class IclEvalConfig(_Strict):
    """``eval:`` error vs number of examples on ``prompts`` fresh prompts per family (up to the curriculum's last
    number of points), against ``baselines`` (None: Garg et al.'s for each class), in and out of distribution."""

    prompts: int = Field(500, ge=1)
    baselines: list[str] | None = Field(None, description="baseline names (None: the class's usual ones)")
    ood: list[ShiftConfig] = Field(default_factory=lambda: [ShiftConfig(name="scaled", factor=2.0),
                                                            ShiftConfig(name="noisy_labels", std=0.5)])
    seed: int = Field(2024, description="seed of the evaluation prompts")

    @field_validator("ood", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v


class IclConfig(_Strict):
    """An in-context learning study: train one model on ``families`` with ``regime`` and ``method``, then evaluate."""

    families: list[FamilyConfig] = Field(min_length=1)
    model: IclModelConfig = Field(default_factory=IclModelConfig)
    regime: RegimeConfig = Field(default_factory=RegimeConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="equal"))
    train: IclTrainConfig = Field(default_factory=IclTrainConfig)
    eval: IclEvalConfig = Field(default_factory=IclEvalConfig)
    seed: Seed = 0
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("families", mode="before")
    @classmethod
    def _family_names(cls, v: Any) -> Any:
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v


def family_kind(name: str, key: str) -> str:
    """``function_class`` or ``token_task`` for a registered family name (torch-free); a ConfigError naming ``key``
    with the closest name otherwise."""
    from polytask.names import NAMES
    from polytask.registry import suggest

    for kind in ("function_class", "token_task"):
        if name in NAMES.get(kind, ()):
            return kind
    known = (*NAMES.get("function_class", ()), *NAMES.get("token_task", ()))
    raise ConfigError(f"{key}: unknown family {name!r}{suggest(name, known)}; known: {', '.join(known)}")


def check_names(config: IclConfig) -> IclConfig:
    """The torch-free checks: family and method names, regime against the families, distinct labels."""
    from polytask.names import check_name

    kinds = {family_kind(f.name, f"families.{i}.name") for i, f in enumerate(config.families)}
    if len(kinds) > 1:
        raise ConfigError("families: function classes and token tasks need separate runs (one model reads vectors, "
                          "the other tokens)")
    for i, f in enumerate(config.families):
        if f.pool and family_kind(f.name, f"families.{i}.name") == "token_task":
            raise ConfigError(f"families.{i}.pool: a task pool is for function classes, not the token task {f.name!r}")
    labels = [f.label for f in config.families]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"families: label {dup[0]!r} is used twice; give each entry a distinct 'label'")
    check_name("method", config.method.name, "method.name")
    if config.regime.kind == "single" and len(config.families) != 1:
        raise ConfigError(f"regime.kind: single trains one family, got {len(config.families)} (use mixture)")
    if config.regime.kind == "task_curriculum" and config.regime.enter_every < 1:
        raise ConfigError("regime.enter_every: a task curriculum needs the steps between families (>= 1)")
    if config.curriculum.dims is not None and kinds == {"token_task"}:
        raise ConfigError("curriculum.dims: token tasks have no input dimension; remove it")
    return config


def check_icl(config: IclConfig) -> IclConfig:
    """Every check, the registries' too: family, baseline and method parameters (imports torch)."""
    from polytask.icl.baselines import BASELINES
    from polytask.icl.discrete import TOKEN_TASKS
    from polytask.icl.functions import FUNCTION_CLASSES
    from polytask.methods import load_all

    check_names(config)
    for i, f in enumerate(config.families):
        registry = FUNCTION_CLASSES if family_kind(f.name, "") == "function_class" else TOKEN_TASKS
        registry.params_for(f.name, f.params, f"families.{i}.params")
    for i, b in enumerate(config.eval.baselines or []):
        BASELINES.get(b) if b in {e.name for e in BASELINES} else _unknown_baseline(b, i, BASELINES)
    load_all().params_for(config.method.name, config.method.params, "method.params")
    return config


def _unknown_baseline(name: str, i: int, registry: Any) -> None:
    from polytask.registry import suggest

    known = [e.name for e in registry]
    raise ConfigError(f"eval.baselines.{i}: unknown baseline {name!r}{suggest(name, known)}; known: {', '.join(known)}")


def load_icl_config(path: str | os.PathLike[str], overrides: list[str] | None = None, full: bool = True) -> IclConfig:
    """Read and validate an icl config (YAML) with ``--set`` overrides; ``full`` False skips the registry checks
    that import torch (the CLI reports a typo first)."""
    config = validate_model(IclConfig, read_yaml(path, overrides))
    assert isinstance(config, IclConfig)
    return check_icl(config) if full else check_names(config)


def dump_icl_config(config: IclConfig) -> str:
    """The resolved configuration as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
