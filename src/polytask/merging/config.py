"""The ``polytask merge`` configuration: a checkpoint merge, or a merging experiment on a suite.

A checkpoint merge names a base, the models (each with a weight and per-model parameter overrides), a
method with its parameters, and an output::

    method: ties
    params: {density: 0.2, lambda: 1.0}
    base: ./base                     # safetensors file, HF directory, polytask job/run directory
    models:
      - ./math                       # a path, or a mapping with per-model settings:
      - {path: ./code, weight: 0.5, params: {density: 0.3}}
      - {path: ./chat-lora}          # a PEFT LoRA adapter directory
    output: {path: ./merged, shard_size: 2GB, dtype: auto}
    options: {check_finite: true, vocab: shared}

A config with a ``suite:`` key is an experiment (see :class:`ExperimentConfig`): pretrain a backbone,
fine-tune one model per task, merge with every listed method, evaluate every task.
Unknown keys are errors naming the key and suggesting the closest valid one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from polytask.config import (
    ExecutorConfig,
    ModelConfig,
    SuiteConfig,
    TrainConfig,
    executor_by_name,
    names_as_methods,
    read_yaml,
)
from polytask.errors import ConfigError
from polytask.merging.mergekit import from_mergekit, is_mergekit, mergekit_notes
from polytask.merging.methods import METHODS, canonical_method, model_params_for, passes_of
from polytask.merging.stream import MergeOptions
from polytask.registry import validate_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    path: str = Field(description="checkpoint: safetensors file, HF or PEFT directory, polytask job/run directory")
    job: str = Field("", description="for a polytask run directory: the job to read (e.g. stl/digit)")
    weight: float = Field(1.0, description="multiplies this model's task vector (or its share of an average); "
                          "negative negates it")
    params: dict[str, Any] = Field(default_factory=dict, description="this model's overrides of per-model "
                                   "parameters (density, drop_rate, gamma)")


class OutputSpec(_Strict):
    path: str = Field(description="output directory (must not exist unless overwrite)")
    shard_size: int | str = Field("2GB", description="largest shard; e.g. 2GB, 500MiB")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="dtype of merged floating tensors (auto: the base's)")
    copy_files: bool = Field(True, description="copy the base's config and tokenizer files alongside")
    overwrite: bool = Field(False, description="replace an existing output (atomically)")


def _as_entry(v: Any) -> Any:
    return {"path": str(v)} if isinstance(v, (str, os.PathLike)) else v


class MergeConfig(_Strict):
    """A data-free merge of checkpoints on disk."""

    method: str = Field(description="merge method (polytask's name, or mergekit's: linear, dare_linear)")
    params: dict[str, Any] = Field(default_factory=dict)
    base: ModelEntry | None = Field(None, description="the shared pretrained model (required by task-vector "
                                    "methods; average uses the first model's layout without one)")
    models: list[ModelEntry] = Field(min_length=1)
    output: OutputSpec
    options: MergeOptions = Field(default_factory=MergeOptions)

    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("base", mode="before")
    @classmethod
    def _path_as_entry(cls, v: Any) -> Any:
        return _as_entry(v) if v is not None else v

    @field_validator("output", mode="before")
    @classmethod
    def _path_as_output(cls, v: Any) -> Any:
        return {"path": str(v)} if isinstance(v, (str, os.PathLike)) else v

    @field_validator("models", mode="before")
    @classmethod
    def _paths_as_entries(cls, v: Any) -> Any:
        return [_as_entry(m) for m in v] if isinstance(v, list) else v


class MethodSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str = Field("", description="name in results (default: the method name)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="parameter values to try; the one "
                                       "with the best mean validation score is used (e.g. lambda: [0.3, 0.5, 1])")

    def model_post_init(self, __context: Any) -> None:
        if not self.label:
            self.label = self.name


class PretrainSpec(_Strict):
    tasks: list[str] = Field(default_factory=list, description="tasks the backbone is pretrained on (default all)")
    fraction: float = Field(0.5, ge=0, lt=1, description="share of training rows used only for pretraining; the "
                            "rest fine-tunes the per-task models (0: both use all rows)")
    epochs: int = Field(5, ge=1)
    lr: float | None = Field(None, gt=0, description="default: train.optimizer.lr")


class FinetuneSpec(_Strict):
    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0, description="default: train.optimizer.lr")


class DataSpec(_Strict):
    n_examples: int = Field(256, ge=1, description="inputs per task given to data-driven methods (Fisher and "
                            "RegMean from training rows, AdaMerging and DivMerge from unlabelled test inputs)")


class ExperimentOutput(_Strict):
    dir: str = Field("runs", description="parent folder")
    name: str = Field("", description="run directory name (default: merge-<suite>-<time>)")


class ExperimentConfig(_Strict):
    """Pretrain, fine-tune per task, merge with every method, evaluate every task."""

    seed: int = 0
    suite: SuiteConfig
    tasks: list[str] = Field(default_factory=list, description="tasks to merge (default: all of the suite)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec(name="task_arithmetic")])
    data: DataSpec = Field(default_factory=DataSpec)
    options: MergeOptions = Field(default_factory=MergeOptions)
    output: ExperimentOutput = Field(default_factory=ExperimentOutput)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="where the per-task fine-tunes "
                                     "train (sequential or ray; the backbone's pretraining comes first)")

    @field_validator("methods", mode="before")
    @classmethod
    def _names_as_methods(cls, v: Any) -> Any:
        return names_as_methods(v)

    @field_validator("executor", mode="before")
    @classmethod
    def _name_as_executor(cls, v: Any) -> Any:
        return executor_by_name(v)



def check_config(cfg: MergeConfig | ExperimentConfig) -> MergeConfig | ExperimentConfig:
    """Validate what depends on the method registry: method names, their parameters, per-model keys."""
    if isinstance(cfg, MergeConfig):
        cfg.method = canonical_method(cfg.method)
        entry = METHODS.get(cfg.method)
        if entry.extra.get("kind") != "data-free":
            raise ConfigError(f"method: {cfg.method!r} is data-driven; it runs in an experiment config (with "
                              "'suite:'), not on checkpoints")
        p = METHODS.params_for(cfg.method, cfg.params, "params")
        model_params_for(cfg.method, p, [m.params for m in cfg.models])
        passes_of(cfg.method, p)
        if entry.extra.get("needs_base") and cfg.base is None:
            raise ConfigError(f"base: method {cfg.method!r} needs the base (pretrained) model")
        return cfg
    labels = [m.label for m in cfg.methods]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"methods: label {sorted(dup)[0]!r} is used twice; give each a distinct 'label'")
    for i, m in enumerate(cfg.methods):
        m.name = canonical_method(m.name, f"methods.{i}.name")
        METHODS.params_for(m.name, m.params, f"methods.{i}.params")
        for key, values in m.grid.items():
            if not values:
                raise ConfigError(f"methods.{i}.grid.{key}: give at least one value")
            for v in values:
                METHODS.params_for(m.name, {**m.params, key: v}, f"methods.{i}.grid")
    return cfg


def load_merge_config(path: str | os.PathLike[str], overrides: list[str] | None = None,
                      output: str | os.PathLike[str] | None = None) -> MergeConfig | ExperimentConfig:
    """Read a merge YAML (checkpoint merge, or experiment if it has ``suite``), apply ``--set`` overrides,
    validate everything; relative paths are taken relative to the config file. A config in mergekit's layout
    (``merge_method``, ``base_model``, ``models``, ``parameters``, ``dtype``) is read as the same merge (see
    :mod:`polytask.merging.mergekit`); ``output`` (the command line's OUTPUT) sets ``output.path``."""
    p = Path(path)
    data = read_yaml(p, overrides)
    if "suite" in data:
        if output is not None:
            raise ConfigError("OUTPUT: an experiment config names its run directory in output.dir/output.name")
        exp = validate_model(ExperimentConfig, data)
        assert isinstance(exp, ExperimentConfig)
        return check_config(exp)
    notes = []
    if is_mergekit(data):
        notes = mergekit_notes(data)
        data = from_mergekit(data, p.parent)
        out = data.get("output")
        if output is None and not (isinstance(out, str) or (isinstance(out, dict) and "path" in out)):
            raise ConfigError("a mergekit-style config has no output: give it on the command line, "
                              "polytask merge CONFIG OUTPUT (as mergekit-yaml CONFIG OUTPUT)")
    if output is not None:
        out = data.get("output")
        data["output"] = {**(out if isinstance(out, dict) else {}), "path": str(Path(output).absolute())}
    cfg = validate_model(MergeConfig, data)
    assert isinstance(cfg, MergeConfig)
    cfg._notes = notes
    root = p.parent
    for entry in [cfg.base, *cfg.models]:
        if entry is not None and not Path(entry.path).is_absolute():
            entry.path = str(root / entry.path)
    if not Path(cfg.output.path).is_absolute():
        cfg.output.path = str(root / cfg.output.path)
    return check_config(cfg)
