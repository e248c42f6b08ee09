"""Typed experiment configuration, validated before any work starts.

An unknown key is an error naming the key and the closest valid one; a bad value names the key and the
reason. ``load_config()`` with no path is the built-in default experiment (``default_experiment.yaml``);
``Config()`` holds the defaults of every key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from polytask.errors import ConfigError
from polytask.registry import validate_model

# a seed is what numpy's legacy seeding accepts (0 .. 2**32 - 1); derived job and step seeds stay in torch's range
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

DEFAULT_EXPERIMENT = Path(__file__).with_name("default_experiment.yaml")

# the default method comparison's representative set: weightings and aggregators from each family
DEFAULT_METHODS = ("equal", "uw", "pcgrad", "cagrad", "nashmtl", "aligned_mtl", "famo", "upgrad")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FACTORY = r"^$|^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


def is_import_path(name: str) -> bool:
    """``package.module:attribute``: the user's own code named in a config, instead of a registered name."""
    return ":" in name


def import_factory(path: str, key: str) -> Any:
    """The object at ``path`` (``package.module:attribute``); a ConfigError naming ``key`` and the path when the
    module cannot be imported or has no such attribute."""
    import importlib

    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module!r} of {path!r} ({e}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {path!r} is not callable")
    return obj


class SuiteConfig(_Strict):
    """``suite:`` which tasks and data: a built-in suite by name with its parameters, or your own factory."""

    name: str = Field("multidigits", description="a built-in suite (see `polytask suites`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the suite's parameters")
    factory: str = Field("", pattern=FACTORY, description="your own suite instead: `package.module:function`, "
                         "called with the params as keywords (and seed=, when it takes one); returns a TaskSuite")

    def model_post_init(self, __context: Any) -> None:
        if self.factory and self.name != self.factory:
            self.name = self.factory  # built wherever suites are built: build_suite resolves import paths


class ModelConfig(_Strict):
    """``model:`` the shared backbone and the multi-task architecture around it (or your own model factory), and
    optional starting weights."""

    backbone: str = Field("mlp", description="shared encoder: mlp or lenet")
    backbone_params: dict[str, Any] = Field(default_factory=dict)
    architecture: str = Field("hard", description="multi-task architecture")
    architecture_params: dict[str, Any] = Field(default_factory=dict)
    embedding_dim: int | None = Field(None, ge=1, le=4096, description="width of every categorical column's "
                                      "embedding (a table's categorical features); none: min(16, round(1.6 * "
                                      "codes ** 0.56)) per column")
    init_from: str = Field("", description="safetensors file of starting weights (e.g. a pretrained encoder); "
                           "tensors whose names and shapes match the model are loaded, the rest keep their init")
    factory: str = Field("", pattern=FACTORY, description="your own model instead of backbone and architecture: "
                         "`package.module:function`, called with the tasks, the input shape and the "
                         "backbone_params as keywords; returns an nn.Module giving a dict task -> output")

    def model_post_init(self, __context: Any) -> None:
        if self.factory and self.backbone != self.factory:
            self.backbone = self.factory  # built wherever models are built: build_model resolves import paths


FUSED = ("torch's fused implementation: one kernel call a step updates every parameter instead of a Python loop over "
         "them (on CPU a small model's optimiser step is 2-3x faster); numerically close to the default, not "
         "bit-identical with it")


class OptimizerConfig(_Strict):
    """``train.optimizer:`` the optimiser every job of the run uses (``polytask.engine.optim`` builds it)."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    fused: bool = Field(False, description=FUSED)


class SchedulerConfig(_Strict):
    """``train.scheduler:`` the learning-rate schedule, stepped once per epoch."""

    name: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(10, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, description="step: decay factor")


class TrainConfig(_Strict):
    """``train:`` how each job trains: epochs, batches, optimiser, checkpoints, device and precision. The same for
    every job of a run, so that methods are compared on equal terms."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    checkpoint_every: int = Field(100, ge=0, description="also checkpoint every N steps (0: only each epoch)")
    checkpoint_interval_s: float = Field(
        1.0, ge=0, description="skip a checkpoint (epoch or step) within this many seconds of the previous one or "
        "of the job's start; a job's last is always written (a continual experience's end state instead, itself "
        "skipped within this many seconds of the previous end state, the last experience's always written); "
        "resumes stay exact (0: every one)")
    threads: int = Field(1, ge=0, description="torch CPU threads (0: torch's default)")
    eval_batch_size: int = Field(1024, ge=1)
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$",
                        description="cpu, cuda, cuda:N, or auto (cuda when available)")
    deterministic: bool = Field(True, description="on CUDA, deterministic kernels (exact resume; slower)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward pass and losses under bfloat16 autocast (CPU or CUDA); per-task "
        "gradients, the float64 Gramian, the method and the optimiser stay in full precision")
    accumulate: int = Field(1, ge=1, description="micro-batches (of batch_size rows) per optimiser step; the method "
                            "sees the whole effective batch (aggregators aggregate once)")


class MethodConfig(_Strict):
    """One entry of ``methods:``: a registered joint method (weighting or aggregator), its parameters, and how its
    per-task gradients are taken."""

    name: str = Field(description="a registered method (see `polytask methods`)")
    params: dict[str, Any] = Field(default_factory=dict)
    label: str = Field("", description="name in results; defaults to the method name")
    grad_mode: Literal["params", "representation"] = Field(
        "params", description="aggregators: per-task gradients of the shared parameters (exact) or of the "
        "shared representation, per sample (cheaper)")
    chunk_size: int = Field(0, ge=0, description="aggregators: tasks per batched backward pass (0: all)")
    sam_rho: float = Field(0.0, ge=0, description="F-MTL: per-task sharpness-aware radius (0: off)")

    def model_post_init(self, __context: Any) -> None:
        if not self.label:
            self.label = self.name


class BaselineConfig(_Strict):
    """``baselines:`` the single-task models every method is compared against (Δm% needs them)."""

    single_task: bool = Field(True, description="train one model per task (needed for Δm%)")
    cache: bool = Field(True, description="reuse single-task results across runs with the same config")


ESTIMATORS = ("lookahead", "grad_cosine", "datamap", "pairwise", "logme", "leep", "hscore", "nce")
Estimator = Literal["lookahead", "grad_cosine", "datamap", "pairwise", "logme", "leep", "hscore", "nce"]


class RelateConfig(_Strict):
    """``relate:`` which task-affinity estimators to run and the joint run their probes ride on."""

    estimators: list[Estimator] = Field(["lookahead", "grad_cosine"], min_length=1,
                                        description=f"affinity estimators: {', '.join(ESTIMATORS)}")
    every: int = Field(10, ge=1, description="probe every N steps of the joint run (lookahead, grad_cosine)")
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="equal"),
                                 description="the joint training run the probes ride on")
    lookahead_update: Literal["sgd", "optimizer"] = Field(
        "sgd", description="lookahead step: sgd (TAG's paper: lr * task gradient, no optimiser state) or optimizer "
        "(the run's optimiser rule with its momentum / Adam moments)")
    lookahead_lr: float | None = Field(None, gt=0, description="lookahead sgd step size (default: the run's lr)")
    logme_evidence: Literal["final", "official"] = Field(
        "final", description="LogME evidence: final (exact at the returned alpha, beta) or official (as the "
        "reference code: the last iteration's terms, no (D - rank) log alpha term)")


class NetworkConfig(_Strict):
    """A candidate network with its own cost (Standley et al. 2020: e.g. a half-size network at cost 0.5)."""

    tasks: list[str] = Field(min_length=1, description="the tasks it serves")
    cost: float = Field(gt=0, description="its share of the budget (a full-size network of the affinity costs "
                        "group.network_cost)")
    losses: dict[str, float] | None = Field(
        None, description="measured validation loss per task; none: polytask group trains it and measures them "
        "(pairwise estimator), or values it by the affinity's score (other estimators)")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the model section for this "
                                  "network, e.g. {backbone_params: {hidden: [32, 8]}} for a half-size one")
    label: str = Field("", description="its name in results (default: custom-<i>)")


class SingleTaskNetworks(_Strict):
    """One extra single-task network per task (Standley et al. 2020's half-size networks at cost 0.5)."""

    cost: float = Field(0.5, gt=0)
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the model section, e.g. "
                                  "{backbone_params: {hidden: [32, 8]}}")
    label: str = Field("half-size")


class GroupConfig(_Strict):
    """``group:`` how tasks are grouped into networks (budget, candidate networks, solver) and how the chosen
    grouping is checked against all-in-one, independent and random groupings."""

    budget: float = Field(2, gt=0, description="total cost of the networks: each network of the affinity costs "
                          "network_cost, listed networks their own")
    network_cost: float = Field(1.0, gt=0, description="cost of each network built from the affinity estimate")
    networks: list[NetworkConfig] = Field(default_factory=list, description="extra candidate networks with "
                                          "their own costs and measured or estimated losses")
    single_task_networks: SingleTaskNetworks | None = Field(
        None, description="add one candidate single-task network per task (e.g. half-size at cost 0.5)")
    estimator: Estimator = Field("lookahead", description="the affinity that chooses the groups")
    solver: Literal["auto", "exact", "beam"] = Field(
        "auto", description="auto: exact up to 16 tasks (14 with listed networks), else beam")
    max_group_size: int | None = Field(None, ge=1)
    singleton_score: float = Field(
        -1e6, allow_inf_nan=False, description="TAG score of a task alone (no mates to receive affinity from): "
        "TAG's official -1e6 keeps every task in a group unless the budget forces otherwise; 0 reads 'alone: "
        "no transfer', so a task stays alone when every group would give it negative affinity")
    stg_form: Literal["soft", "hard"] = Field(
        "soft", description="datamap estimator (STG-MTL): soft = the paper's form, one model per cluster on all "
        "tasks with losses weighted by membership, served by the membership-weighted ensemble; hard = one model "
        "per cluster on its member tasks only")
    seeds: list[Seed] = Field([0, 1, 2], min_length=1, description="training seeds of the comparison")
    random_groupings: int = Field(3, ge=0, description="random groupings (same budget) per seed")


class ExecutorConfig(_Strict):
    """``executor:`` where the independent jobs of run, relate, group and merge experiments train
    (:mod:`polytask.flows.executor`); ``executor: ray`` is short for ``{name: ray}``. Results are the same either
    way."""

    name: Literal["sequential", "ray"] = Field("sequential", description="sequential: one after another in this "
                                               "process; ray: as Ray tasks (pip install 'polytask[ray]')")
    address: str = Field("", description="ray: '' starts a local cluster in this process; 'auto' or "
                         "ray://host:port joins a running one (the run directory must be on a shared file system)")
    workers: int = Field(0, ge=0, description="ray: jobs in flight at once (0: as many as the cluster's CPUs)")
    max_retries: int = Field(3, ge=0, description="ray: times a job whose worker died is started again (it resumes "
                             "from its checkpoint)")


class OutputConfig(_Strict):
    """``output:`` where the run directory goes."""

    dir: str = Field("runs", description="parent folder of run directories")
    name: str = Field("", description="run directory name (default: suite and time)")


class MlflowTrackConfig(_Strict):
    """``track.mlflow:`` log every job to MLflow (pip install 'polytask[track]')."""

    uri: str = Field(min_length=1, description="a tracking URI (http://..., sqlite:///..., file:///...) or a local "
                     "directory (MLflow's file store)")
    experiment: str = Field("polytask", min_length=1, description="the MLflow experiment (created if missing)")


class TensorBoardTrackConfig(_Strict):
    """``track.tensorboard:`` write TensorBoard event files (pip install 'polytask[track]')."""

    dir: str = Field(min_length=1, description="parent folder: <dir>/<run>/<job> per job, <dir>/<run>/_run for "
                     "the config and summary")


class TrackConfig(_Strict):
    """``track:`` experiment trackers riding on every job of ``polytask run`` (:mod:`polytask.tracking`): the
    config, per-epoch per-task losses, metrics and weights, and the summary. Both off by default."""

    mlflow: MlflowTrackConfig | None = Field(None, description="{uri: ..., experiment: ...}")
    tensorboard: TensorBoardTrackConfig | None = Field(None, description="{dir: ...}")


class Config(_Strict):
    """An experiment (``polytask run / relate / group``): suite, model, training, methods and baselines, plus the
    relate and group sections. Validated before any work starts; an unknown key is an error that names it.
    :func:`load_config` reads one from YAML."""

    flow: Literal["compare", "advise"] = Field(
        "compare", description="compare: single-task baselines and every method on all tasks; advise: estimate "
        "affinity, choose groups (group.*), train them against all-in-one, independent and random groupings and "
        "with every method, and say which plan to train")
    seed: Seed = 0
    suite: SuiteConfig = Field(default_factory=SuiteConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: list[MethodConfig] = Field(default_factory=lambda: [MethodConfig(name=n) for n in DEFAULT_METHODS],
                                        min_length=1, description="at least one; leave out for the default set")
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    track: TrackConfig = Field(default_factory=TrackConfig, description="experiment trackers (off by default)")
    relate: RelateConfig = Field(default_factory=RelateConfig)
    group: GroupConfig = Field(default_factory=GroupConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @field_validator("methods", mode="before")
    @classmethod
    def _names_as_methods(cls, v: Any) -> Any:
        return names_as_methods(v)

    @field_validator("executor", mode="before")
    @classmethod
    def _name_as_executor(cls, v: Any) -> Any:
        return executor_by_name(v)


def executor_by_name(v: Any) -> Any:
    """Let ``executor: ray`` stand for ``executor: {name: ray}``."""
    return {"name": v} if isinstance(v, str) else v


def names_as_methods(v: Any) -> Any:
    """Let a method list mix bare names and mappings: ``[equal, {name: static, ...}]``."""
    return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


def check(config: Config) -> Config:
    """Validate the names (first, without torch) and parameters that depend on registries (suites, models,
    methods)."""
    from polytask.names import check_name

    # the user's code named by import path bypasses the index of registered names; it is imported below
    suite_factory, model_factory = is_import_path(config.suite.name), is_import_path(config.model.backbone)
    if not suite_factory:
        check_name("suite", config.suite.name, "suite.name")
    if not model_factory:
        check_name("backbone", config.model.backbone, "model.backbone")
    check_name("architecture", config.model.architecture, "model.architecture")
    for i, m in enumerate(config.methods):
        check_name("method", m.name, f"methods.{i}.name")
    check_name("method", config.relate.method.name, "relate.method.name")

    from polytask.methods import load_all
    from polytask.models import ARCHITECTURES, BACKBONES
    from polytask.tasks import SUITES

    try:
        if suite_factory:
            import_factory(config.suite.name, "suite.factory")
        else:
            SUITES.params_for(config.suite.name, config.suite.params, "suite.params")
        if model_factory:
            import_factory(config.model.backbone, "model.factory")
        else:
            BACKBONES.params_for(config.model.backbone, config.model.backbone_params, "model.backbone_params")
        ARCHITECTURES.params_for(config.model.architecture, config.model.architecture_params,
                         "model.architecture_params")
        for i, m in enumerate(config.methods):
            load_all().params_for(m.name, m.params, f"methods.{i}.params")
            if load_all().get(m.name).extra.get("pareto") and (m.grad_mode != "params" or m.sam_rho):
                raise ConfigError(f"methods.{i}: {m.name} differentiates its multi-forward losses (no shared "
                                  "features, no F-MTL); use grad_mode: params and sam_rho: 0")
        load_all().params_for(config.relate.method.name, config.relate.method.params, "relate.method.params")
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    labels = [m.label for m in config.methods]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"methods: label {sorted(dup)[0]!r} is used twice; give each a distinct 'label'")
    if "stl" in labels:
        raise ConfigError("methods: the label 'stl' is reserved for the single-task baselines")
    return config


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place; list items by index."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has no item {part}")
            idx: Any = int(part)
        else:
            idx = part
        if last:
            node[idx] = value
        else:
            if isinstance(node, dict) and idx not in node:
                node[idx] = {}
            if isinstance(node[idx], str):  # a method given by name: expand to a mapping
                node[idx] = {"name": node[idx]}
            node = node[idx]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value ({node!r}), not a "
                                  f"section with keys; set it directly, e.g. --set {'.'.join(parts[:i + 1])}=...")


def read_yaml(path: str | os.PathLike[str], overrides: list[str] | None = None) -> dict[str, Any]:
    """The mapping in a YAML config file with ``--set`` overrides applied; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: the top level must be a mapping of keys")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return data


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the default experiment), apply ``--set`` overrides, validate everything."""
    data = read_yaml(DEFAULT_EXPERIMENT if path is None else path, overrides)
    config = validate_model(Config, data)
    assert isinstance(config, Config)
    return check(config)


def dump_config(config: Config) -> str:
    """The resolved configuration as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
