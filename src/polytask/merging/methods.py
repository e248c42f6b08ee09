"""Merge methods found by name. Each is a small function over the tensors of one name, with the paper
named in its docstring and its parameters typed (pydantic, unknown keys are errors).

Data-free methods take a :class:`MergeInputs` (the base tensor, one tensor per model, per-model weights and
parameters) and return the merged tensor; the streaming merge calls them name by name. A method that
needs a statistic of every tensor first (MetaGPT's norms, LwPTV's layer saliency, a model-wide trim
threshold) also registers ``passes(params)``: the :class:`StatsPass` es to run, each a read of every tensor
before the merge; ``inp.stats`` then holds the last pass's value for the tensor.
Data-driven methods (``kind="data"``, in :mod:`polytask.merging.data_driven`) need models polytask can
run and inputs to run them on.

Registry ``extra`` keys: ``kind`` (``data-free``/``data``), ``per_model`` (parameters a model entry may
override), ``order_invariant`` (permuting the models, with their weights, gives the same result),
``uses_weights`` (per-model ``weight`` is meaningful), ``weight_sum`` (the method divides by the summed
weights, so they must not sum to zero), ``identity(K)`` (parameters under which merging K
copies of one model returns it: the property suite checks this for every method).
"""

from __future__ import annotations

import difflib
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.errors import ConfigError
from polytask.merging import ops
from polytask.registry import Registry


@dataclass
class MergeInputs:
    """What a data-free method sees for one tensor name. The base is in the compute dtype; the models' tensors
    may still be in their stored floating dtype (e.g. bfloat16): methods read them as if converted (an exact
    widening), so converting them first is never needed."""

    name: str
    base: Tensor | None
    tensors: list[Tensor]
    weights: list[float]
    params: BaseModel
    model_params: list[BaseModel]
    seed: int = 0
    stats: Any = None
    consume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None  # the compute dtype (None: the tensors' own); models may be stored narrower

    def need_base(self, method: str) -> Tensor:
        """The base tensor, for methods that need task vectors; a ConfigError naming ``method`` when there is none."""
        if self.base is None:
            raise ConfigError(f"method {method!r} needs a base model (the shared pretrained weights)")
        return self.base


@dataclass(frozen=True)
class StatsPass:
    """One read of every merged tensor before the merge: ``update(acc, inp)`` for each tensor name in merge
    order (``inp.stats`` is the previous pass's value for that name), then ``finalize(acc)`` gives each name's
    value (for the next pass, or ``inp.stats`` of the merge)."""

    init: Callable[[], Any]
    update: Callable[[Any, MergeInputs], None]
    finalize: Callable[[Any], dict[str, Any]]


def no_passes(params: BaseModel) -> list[StatsPass]:
    return []


def per_name_pass(stat: Callable[[MergeInputs], Any], finalize: Callable[[dict[str, Any], Any], dict[str, Any]]
                  ) -> Callable[[BaseModel], list[StatsPass]]:
    """One statistics pass keeping a small value per tensor name, then ``finalize(values, params)``."""

    def passes(p: BaseModel) -> list[StatsPass]:
        return [StatsPass(dict, lambda acc, inp: acc.__setitem__(inp.name, stat(inp)), lambda acc: finalize(acc, p))]

    return passes


def run_passes(passes: Sequence[StatsPass], names: Sequence[str], inputs: Callable[[str, Any], MergeInputs],
               done: Callable[[MergeInputs], None] | None = None) -> dict[str, Any]:
    """Run the statistics passes over ``names``; ``inputs(name, stats)`` reads one tensor name, ``done(inp)``
    is told when a pass is finished with it."""
    prev: dict[str, Any] = {}
    for ps in passes:
        acc = ps.init()
        for name in names:
            inp = inputs(name, prev.get(name))
            ps.update(acc, inp)
            if done is not None:
                done(inp)
        prev = ps.finalize(acc)
    return prev


MergeFn = Callable[[MergeInputs], Tensor]
METHODS: Registry[Any] = Registry("merge method")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


_LAMBDA = "lambda: scale of the merged task vector added to the base (0 returns the base)"
_DENSITY = "fraction of each task-vector tensor's entries kept, by magnitude (1 keeps all)"
_DROP = "DARE drop probability p of each task-vector entry (survivors are rescaled by 1/(1-p))"
TrimScope = Literal["tensor", "model"]
TieRule = Literal["first", "all"]
_SCOPE = ("where the trim ranks magnitudes: tensor (each task-vector tensor keeps its own top density, as "
          "mergekit; one read) or model (the top density of the whole task vector, as the TIES paper and "
          "FusionBench; two extra reads of the inputs for the model-wide thresholds)")
_TIES = ("entries tied with the threshold magnitude: first (keep exactly k, the first tied entries in index "
         "order, then tensor order) or all (keep every tied entry, as the official TIES code: possibly more than k)")


class NoParams(_Params):
    """No parameters."""


class TaskArithmeticParams(_Params):
    lam: float = Field(1.0, alias="lambda", description=_LAMBDA)


class _TrimParams(_Params):
    trim_scope: TrimScope = Field("tensor", description=_SCOPE)
    trim_ties: TieRule = Field("first", description=_TIES)


class TiesParams(_TrimParams):
    density: float = Field(0.2, ge=0, le=1, description=_DENSITY)
    lam: float = Field(1.0, alias="lambda", description=_LAMBDA)
    normalize: bool = Field(True, description="disjoint mean: divide by the summed weights of the models "
                            "agreeing with the elected sign (False: their sum)")


class DareParams(_Params):
    drop_rate: float = Field(0.9, ge=0, le=1, description=_DROP)
    lam: float = Field(1.0, alias="lambda", description=_LAMBDA)
    rescale: bool = Field(True, description="rescale survivors by 1/(1-p) (False: only drop)")


class DareTiesParams(_TrimParams):
    drop_rate: float = Field(0.9, ge=0, le=1, description=_DROP)
    density: float = Field(1.0, ge=0, le=1, description=_DENSITY + "; applied after the DARE drop")
    lam: float = Field(1.0, alias="lambda", description=_LAMBDA)
    normalize: bool = Field(True, description="disjoint mean over the agreeing models (False: their sum)")
    rescale: bool = Field(True, description="rescale survivors by 1/(1-p)")


class BreadcrumbsParams(_TrimParams):
    density: float = Field(0.9, ge=0, le=1, description=_DENSITY + " (the band just below the outliers)")
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of each task-vector tensor's largest-magnitude "
                         "entries (outliers) dropped")
    lam: float = Field(1.0, alias="lambda", description=_LAMBDA)


class GeneralizedParams(_TrimParams):
    sparsify: list[Literal["none", "magnitude", "random", "band"]] = Field(
        default_factory=list, description="sparsification steps in order: magnitude (TIES trim), random (DARE), "
        "band (breadcrumbs)")
    consensus: bool = Field(False, description="TIES sign election: keep entries agreeing with the elected sign")
    normalize: bool = Field(False, description="divide by the summed weights (of the agreeing models)")
    density: float = Field(1.0, ge=0, le=1, description=_DENSITY)
    drop_rate: float = Field(0.0, ge=0, le=1, description=_DROP)
    gamma: float = Field(0.0, ge=0, le=1, description="breadcrumbs: fraction of outliers dropped")
    rescale: bool = Field(True, description="DARE: rescale survivors by 1/(1-p)")
    lam: float = Field(1.0, alias="lambda", description=_LAMBDA)


class MetaGPTParams(_Params):
    scope: Literal["layer", "model"] = Field(
        "layer", description="layer: one coefficient per model and layer (module); model: one per model")


class LwPTVParams(_Params):
    threshold: float = Field(0.5, ge=0, description="eta: a model's task vector is pruned at a layer whose "
                             "saliency is below eta (0 prunes nothing)")
    base_method: str = Field("task_arithmetic", description="the data-free method that merges the pruned "
                             "task vectors")
    base_params: dict[str, Any] = Field(default_factory=dict, description="parameters of base_method")


def dare_generator(seed: int, name: str, k: int) -> np.random.BitGenerator:
    """The random stream of model ``k``'s drop mask for tensor ``name``: a pure function of (seed, name, k),
    so a merge is reproducible and independent of the order tensors are processed in."""
    return ops.drop_stream(seed, zlib.crc32(name.encode()), k)


def _generators(inp: MergeInputs, sparsify: Sequence[str]) -> list[np.random.BitGenerator] | None:
    return [dare_generator(inp.seed, inp.name, k) for k in range(len(inp.tensors))] if "random" in sparsify else None


def _gta(inp: MergeInputs, method: str, *, sparsify: Sequence[str], consensus: bool, normalize: bool,
         lam: float, rescale: bool = True) -> Tensor:
    base = inp.need_base(method)
    mp = inp.model_params
    p = inp.params
    model_scope = getattr(p, "trim_scope", "tensor") == "model" and any(s in ops.TRIM_STEPS for s in sparsify)
    return ops.generalized_task_arithmetic(
        base, inp.tensors, inp.weights, sparsify=tuple(sparsify) or "none",
        density=[getattr(q, "density", 1.0) for q in mp], drop_rate=[getattr(q, "drop_rate", 0.0) for q in mp],
        gamma=[getattr(q, "gamma", 0.0) for q in mp], generators=_generators(inp, sparsify), consensus=consensus,
        normalize=normalize, lam=lam, rescale=rescale, tie_rule=getattr(p, "trim_ties", "first"),
        trims=inp.stats if model_scope else None, consume=inp.consume)


@dataclass
class _ModelTrim:
    """State of the model-wide trim passes: per model, a radix selection over its whole task vector."""

    steps: list[str]
    selects: list[ops.RadixSelect] = field(default_factory=list)
    ranks: list[tuple[int, int] | None] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    model_params: list[BaseModel] = field(default_factory=list)

    def taus(self, inp: MergeInputs) -> list[Tensor]:
        """Each model's task vector as the trim sees it: after the sparsification steps before the trim."""
        base = inp.need_base("trim_scope: model")
        gens = _generators(inp, self.steps)
        p = inp.params
        return [ops.task_vector(base, t, self.steps, drop_rate=getattr(q, "drop_rate", 0.0),
                                generator=gens[k] if gens else None, rescale=getattr(p, "rescale", True),
                                consume=inp.consume)
                for k, (t, q) in enumerate(zip(inp.tensors, inp.model_params, strict=True))]


def _sparsify_steps(method: str, p: BaseModel) -> list[str]:
    fixed = {"ties": ["magnitude"], "dare_ties": ["random", "magnitude"], "breadcrumbs": ["band"]}
    return fixed[method] if method in fixed else list(getattr(p, "sparsify", []))


def model_trim_passes(method: str) -> Callable[[BaseModel], list[StatsPass]]:
    """The two statistics passes of ``trim_scope: model``: the top 16 bits of every magnitude of each task
    vector, then the low 16 bits inside the buckets that hold the model-wide ranks (exact thresholds)."""

    def passes(p: BaseModel) -> list[StatsPass]:
        if getattr(p, "trim_scope", "tensor") != "model":
            return []
        steps = _sparsify_steps(method, p)
        trims = [i for i, s in enumerate(steps) if s in ops.TRIM_STEPS]
        if not trims:
            return []
        if len(trims) > 1:
            raise ConfigError(f"params.trim_scope: model takes one magnitude or band step in {method}'s sparsify "
                              f"(got {steps})")
        kind = steps[trims[0]]
        rule = getattr(p, "trim_ties", "first")

        state = _ModelTrim(steps[:trims[0]])  # both passes fill this one state (one merge calls passes once)

        def high(acc: _ModelTrim, inp: MergeInputs) -> None:
            if not acc.selects:
                acc.selects = [ops.RadixSelect() for _ in inp.tensors]
                acc.model_params = list(inp.model_params)
            acc.names.append(inp.name)
            for sel, tau in zip(acc.selects, acc.taus(inp), strict=True):
                sel.count_high(tau)

        def locate(acc: _ModelTrim) -> dict[str, Any]:
            for sel, q in zip(acc.selects, acc.model_params, strict=True):
                ranks = ops.trim_ranks(kind, sel.n, getattr(q, "density", 1.0), getattr(q, "gamma", 0.0))
                acc.ranks.append(ranks)
                if ranks is not None and ranks[0] > 0:
                    sel.locate(ops.needed_ranks(*ranks, rule))
            return {}

        def low(acc: _ModelTrim, inp: MergeInputs) -> None:
            for sel, ranks, tau in zip(acc.selects, acc.ranks, acc.taus(inp), strict=True):
                if ranks is not None and ranks[0] > 0:
                    sel.count_low(tau)

        def finish(acc: _ModelTrim) -> dict[str, Any]:
            trims_ = [None if r is None else ops.trim_of(sel.thresholds() if r[0] > 0 else {}, *r, rule)
                      for sel, r in zip(acc.selects, acc.ranks, strict=True)]
            return dict.fromkeys(acc.names, trims_)

        return [StatsPass(lambda: state, high, locate), StatsPass(lambda: state, low, finish)]

    return passes


def _identity_lambda(k: int) -> dict[str, Any]:
    return {"lambda": 1.0 / k}


@METHODS.register("average", summary="weight averaging: sum_k w_k theta_k / sum_k w_k",
                  paper="Wortsman et al. 2022, Model soups", kind="data-free", per_model=(),
                  order_invariant=True, uses_weights=True, needs_base=False, weight_sum="nonzero",
                  identity=lambda k: {})
def average(inp: MergeInputs) -> Tensor:
    """Weight averaging (Wortsman et al. 2022, "Model soups"): the weighted mean of the models; the base is
    not part of it (list it as a model to include it)."""
    dtype = inp.dtype or (inp.base.dtype if inp.base is not None else None)
    reuse = inp.consume and inp.base is not None and inp.base.dtype == dtype and inp.base.is_contiguous()
    return ops.weighted_average(inp.tensors, inp.weights, consume=inp.consume, dtype=dtype,
                                out=inp.base if reuse else None)  # the base is not averaged: its buffer is free


@METHODS.register("task_arithmetic", params=TaskArithmeticParams,
                  summary="base + lambda * sum_k w_k (theta_k - base); negative weights negate a task",
                  paper="Ilharco et al. 2023, Editing Models with Task Arithmetic", kind="data-free", per_model=(),
                  order_invariant=True, uses_weights=True, needs_base=True, identity=_identity_lambda)
def task_arithmetic(inp: MergeInputs) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): add ``lambda`` times the weighted sum of task vectors to the
    base; a negative weight subtracts (negates) that task."""
    p: TaskArithmeticParams = inp.params  # type: ignore[assignment]
    return _gta(inp, "task_arithmetic", sparsify=(), consensus=False, normalize=False, lam=p.lam)


@METHODS.register("ties", params=TiesParams,
                  summary="trim each task vector to its top-density magnitudes, elect a sign, disjoint mean",
                  paper="Yadav et al. 2023, TIES-Merging", kind="data-free", per_model=("density",),
                  order_invariant=True, uses_weights=True, needs_base=True, passes=model_trim_passes("ties"),
                  identity=lambda k: {"density": 1.0, "lambda": 1.0})
def ties(inp: MergeInputs) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim (keep the top ``density`` magnitudes of each task-vector
    tensor), elect the sign of the summed trimmed vectors per entry, average the agreeing entries
    (disjoint mean), scale by ``lambda``.

    Differences from the official code, each an option: the trim ranks each tensor on its own (mergekit's
    choice; the paper ranks the whole task vector: ``trim_scope: model``), and keeps exactly k entries, ties
    at the threshold broken by index (the official ``>= kthvalue`` keeps every tie: ``trim_ties: all``)."""
    p: TiesParams = inp.params  # type: ignore[assignment]
    return _gta(inp, "ties", sparsify=("magnitude",), consensus=True, normalize=p.normalize, lam=p.lam)


@METHODS.register("dare", params=DareParams,
                  summary="drop task-vector entries with probability p, rescale by 1/(1-p), then task arithmetic",
                  paper="Yu et al. 2024, Language Models are Super Mario (DARE)", kind="data-free",
                  per_model=("drop_rate",), order_invariant=False, uses_weights=True, needs_base=True,
                  identity=lambda k: {"drop_rate": 0.0, "lambda": 1.0 / k})
def dare(inp: MergeInputs) -> Tensor:
    """DARE (Yu et al. 2024) with task arithmetic: each task vector keeps an entry with probability 1-p
    (the mask of model k on tensor ``name`` is seeded by (seed, name, k)), survivors are scaled by
    1/(1-p), then ``base + lambda * sum_k w_k tau_k``. Not order invariant: the mask follows the position."""
    p: DareParams = inp.params  # type: ignore[assignment]
    return _gta(inp, "dare", sparsify=("random",), consensus=False, normalize=False, lam=p.lam, rescale=p.rescale)


@METHODS.register("dare_ties", params=DareTiesParams,
                  summary="DARE drop and rescale, then TIES (optional trim, sign election, disjoint mean)",
                  paper="Yu et al. 2024 (DARE) + Yadav et al. 2023 (TIES)", kind="data-free",
                  per_model=("drop_rate", "density"), order_invariant=False, uses_weights=True, needs_base=True,
                  passes=model_trim_passes("dare_ties"),
                  identity=lambda k: {"drop_rate": 0.0, "density": 1.0, "lambda": 1.0})
def dare_ties(inp: MergeInputs) -> Tensor:
    """DARE as a preprocessing step of TIES (Yu et al. 2024, sec. 4): drop and rescale each task vector,
    trim to ``density`` (1: no trim; ``trim_scope``/``trim_ties`` as in TIES), elect signs, disjoint mean,
    scale by ``lambda``."""
    p: DareTiesParams = inp.params  # type: ignore[assignment]
    return _gta(inp, "dare_ties", sparsify=("random", "magnitude"), consensus=True, normalize=p.normalize,
                lam=p.lam, rescale=p.rescale)


@METHODS.register("breadcrumbs", params=BreadcrumbsParams,
                  summary="mask the largest (outliers) and smallest task-vector entries, then task arithmetic",
                  paper="Davari & Belilovsky 2024, Model Breadcrumbs", kind="data-free",
                  per_model=("density", "gamma"), order_invariant=True, uses_weights=True, needs_base=True,
                  passes=model_trim_passes("breadcrumbs"),
                  identity=lambda k: {"density": 1.0, "gamma": 0.0, "lambda": 1.0 / k})
def breadcrumbs(inp: MergeInputs) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): per task-vector tensor drop the ``gamma`` fraction of
    largest magnitudes and the smallest ones so that ``density`` remain, then ``base + lambda * sum``.
    Exactly that many entries survive (ties by index; ``trim_ties: all`` keeps ties on both edges); the paper
    masks per layer, as the default ``trim_scope: tensor`` does (``model``: over the whole task vector)."""
    p: BreadcrumbsParams = inp.params  # type: ignore[assignment]
    return _gta(inp, "breadcrumbs", sparsify=("band",), consensus=False, normalize=False, lam=p.lam)


@METHODS.register("generalized", params=GeneralizedParams,
                  summary="any combination of sparsify (magnitude/random/band) x sign consensus x sum/mean",
                  paper="the shared shape of TIES, DARE and breadcrumbs (mergekit's generalized task arithmetic)",
                  kind="data-free", per_model=("density", "drop_rate", "gamma"), order_invariant=False,
                  uses_weights=True, needs_base=True, passes=model_trim_passes("generalized"),
                  identity=lambda k: {"lambda": 1.0 / k})
def generalized(inp: MergeInputs) -> Tensor:
    """The parts of :func:`polytask.merging.ops.generalized_task_arithmetic` chosen by parameters."""
    p: GeneralizedParams = inp.params  # type: ignore[assignment]
    return _gta(inp, "generalized", sparsify=tuple(p.sparsify), consensus=p.consensus, normalize=p.normalize,
                lam=p.lam, rescale=p.rescale)


def layer_of(name: str) -> str:
    """The layer (module) a tensor belongs to: its name without the last component (``x.weight`` -> ``x``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _task_norms(inp: MergeInputs) -> list[float]:
    base = inp.need_base("metagpt")
    return [ops.squared_norm(t.float() - base.float()) for t in inp.tensors]


def _metagpt_finalize(stats: dict[str, list[float]], params: MetaGPTParams) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for name, norms in stats.items():
        key = layer_of(name) if params.scope == "layer" else ""
        acc = groups.setdefault(key, [0.0] * len(norms))
        for k, v in enumerate(norms):
            acc[k] += v
    coef = {}
    for name in stats:
        norms = groups[layer_of(name) if params.scope == "layer" else ""]
        total = sum(norms)
        coef[name] = [v / total for v in norms] if total > 0 else [1.0 / len(norms)] * len(norms)
    return coef


@METHODS.register("metagpt", params=MetaGPTParams,
                  summary="task arithmetic with closed-form lambda_k = ||tau_k||^2 / sum_j ||tau_j||^2",
                  paper="Zhou et al. 2024, MetaGPT: Merging LLMs Using Model Exclusive Task Arithmetic",
                  kind="data-free", per_model=(), order_invariant=True, uses_weights=False, needs_base=True,
                  passes=per_name_pass(_task_norms, _metagpt_finalize), identity=lambda k: {})
def metagpt(inp: MergeInputs) -> Tensor:
    """MetaGPT (Zhou et al. 2024): ``base + sum_k lambda_k tau_k`` with the closed-form coefficients
    ``lambda_k = ||tau_k||^2 / sum_j ||tau_j||^2`` that minimise the paper's upper bound on the average
    loss gap, per layer (``scope: layer``) or over the whole model (``scope: model``)."""
    base = inp.need_base("metagpt")
    coef = inp.stats
    return ops.generalized_task_arithmetic(base, inp.tensors, coef, consume=inp.consume)


def _lwptv_stats(inp: MergeInputs) -> list[float]:
    base = inp.need_base("lwptv")
    return [ops.squared_norm(t.float() - base.float()) for t in inp.tensors] + [float(base.numel())]


def lwptv_saliency(stats: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per layer and model: the mean squared task-vector entry of the layer divided by that model's mean
    over layers (1 = an average layer of that task vector, near 0 = a layer the fine-tuning barely moved)."""
    layers: dict[str, list[float]] = {}
    for name, v in stats.items():
        acc = layers.setdefault(layer_of(name), [0.0] * len(v))
        for k, x in enumerate(v):
            acc[k] += x
    ms = {layer: [x / max(v[-1], 1.0) for x in v[:-1]] for layer, v in layers.items()}
    k = len(next(iter(ms.values()), []))
    mean = [sum(v[j] for v in ms.values()) / max(len(ms), 1) for j in range(k)]
    return {layer: [v[j] / mean[j] if mean[j] > 0 else 0.0 for j in range(k)] for layer, v in ms.items()}


def _lwptv_finalize(stats: dict[str, list[float]], params: LwPTVParams) -> dict[str, list[bool]]:
    sal = lwptv_saliency(stats)
    return {name: [s >= params.threshold for s in sal[layer_of(name)]] for name in stats}


def _lwptv_base(params: LwPTVParams) -> tuple[Any, BaseModel]:
    entry = METHODS.get(params.base_method)
    if entry.extra.get("kind") != "data-free" or entry.name == "lwptv":
        raise ConfigError(f"lwptv: base_method {params.base_method!r} must be a single-pass data-free method "
                          "(e.g. task_arithmetic, ties, dare, breadcrumbs)")
    bp = METHODS.params_for(entry.name, params.base_params, "params.base_params")
    if passes_of(entry.name, bp):
        raise ConfigError(f"lwptv: base_method {params.base_method!r} with these base_params reads the inputs "
                          "before merging (e.g. trim_scope: model); lwptv wraps single-pass methods only")
    return entry, bp


@METHODS.register("lwptv", params=LwPTVParams,
                  summary="prune each model's task vector at layers of low saliency, then merge with base_method",
                  paper="Zhang et al. 2025, Merging Smarter, Generalizing Better: Enhancing Model Merging on OOD "
                        "Data (LwPTV)", kind="data-free", per_model=("density", "drop_rate", "gamma"),
                  order_invariant=True, uses_weights=True, needs_base=True,
                  passes=per_name_pass(_lwptv_stats, _lwptv_finalize), identity=lambda k: {"threshold": 0.0,
                                                               "base_params": {"lambda": 1.0 / k}})
def lwptv(inp: MergeInputs) -> Tensor:
    """LwPTV (Zhang et al. 2025): a mask per model over layers, from a saliency score of each layer of its
    task vector; a masked layer keeps the pre-trained weights for that model (its task vector is dropped
    there), then the remaining task vectors are merged by ``base_method``. Plug-in for any data-free method.

    Saliency (our reading, see :func:`lwptv_saliency`): the layer's mean squared task-vector entry relative
    to the model's average over layers; layers below ``threshold`` are pruned.
    """
    p: LwPTVParams = inp.params  # type: ignore[assignment]
    base = inp.need_base("lwptv")
    entry, bp = _lwptv_base(p)
    keep = inp.stats
    tensors = [t if keep[k] else ops.own(base, False) for k, t in enumerate(inp.tensors)]
    sub = MergeInputs(inp.name, base, tensors, inp.weights, bp, inp.model_params, inp.seed, None, inp.consume)
    return entry.build(sub)


# other names of the same methods: mergekit's, where it names one of ours differently
ALIASES = {"linear": "average", "dare_linear": "dare"}
_NOT_ALIASES = {"breadcrumbs_ties": "generalized with params {sparsify: [band], consensus: true}",
                "model_soup": "average", "model_soups": "average", "task_vectors": "task_arithmetic",
                "ties_merging": "ties", "dare_merging": "dare", "fisher_merging": "fisher"}


def canonical_method(name: str, where: str = "method") -> str:
    """The registered name of merge method ``name`` (or of mergekit's name for it, see ``ALIASES``). An unknown
    name is an error suggesting the method meant: spelling variants (``TIES-merging``, ``ties_merging``) are
    matched on their words before the closest spelling is tried."""
    if name in METHODS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    key = re.sub(r"[-\s.]+", "_", str(name).strip().lower())
    words = [w for w in key.split("_") if w not in ("merging", "merge", "method", "")]
    hint = None
    for cand in (key, "_".join(words), *words):
        if cand in METHODS or cand in ALIASES or cand in _NOT_ALIASES:
            hint = _NOT_ALIASES.get(cand, ALIASES.get(cand, cand))
            break
    if hint is None:
        close = difflib.get_close_matches(key, [*METHODS.names(), *ALIASES, *_NOT_ALIASES], n=1, cutoff=0.6)
        hint = (_NOT_ALIASES.get(close[0], ALIASES.get(close[0], close[0]))) if close else None
    did = f" (did you mean {hint!r}?)" if hint and " " not in hint else (f" (mergekit's {key} is {hint})" if hint
                                                                           else "")
    raise ConfigError(f"{where}: unknown merge method {name!r}{did}; known: {', '.join(METHODS.names())}")


def model_params_for(method: str, params: BaseModel, overrides: Sequence[dict[str, Any]]) -> list[BaseModel]:
    """Each model's effective parameters: the shared ``params`` with that model's overrides of per-model keys."""
    entry = METHODS.get(method)
    if method == "lwptv":  # its models carry the parameters of the method it wraps
        base_entry, base_params = _lwptv_base(params)  # type: ignore[arg-type]
        return model_params_for(base_entry.name, base_params, overrides)
    allowed = set(entry.extra.get("per_model", ()))
    out = []
    for i, ov in enumerate(overrides):
        bad = [k for k in ov if k not in allowed]
        if bad:
            why = f"per-model keys of {method}: {', '.join(sorted(allowed))}" if allowed else \
                f"{method} has no per-model parameters"
            raise ConfigError(f"models.{i}.params: {bad[0]!r} cannot be set per model ({why})")
        if not ov:
            out.append(params)
            continue
        out.append(METHODS.params_for(method, {**params.model_dump(by_alias=True), **ov}, f"models.{i}.params"))
    return out


def data_free_setup(method: str, params: dict[str, Any] | BaseModel | None, weights: Sequence[float] | None,
                    model_params: Sequence[dict[str, Any]] | None, n: int
                    ) -> tuple[Any, BaseModel, list[BaseModel], list[float]]:
    """A data-free method's entry, validated parameters, per-model parameters and weights for n models."""
    method = canonical_method(method)
    entry = METHODS.get(method)
    if entry.extra.get("kind") != "data-free":
        raise ConfigError(f"method {method!r} is data-driven: it needs models and data (see merge_experiment)")
    p = METHODS.params_for(method, params, "params")
    mp = model_params_for(method, p, model_params or [{}] * n)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    check_weights(method, w)
    return entry, p, mp, w


def check_weights(method: str, weights: Sequence[float]) -> None:
    """Refuse model weights ``method`` cannot use, before any work: non-finite weights, and for a method that
    divides by the summed weights (``weight_sum``: a weighted mean) weights summing to zero, or negative ones
    where the method needs them positive (``weight_sum: "positive"``: Fisher's weighted mean of Fishers)."""
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ConfigError(f"models.{i}.weight: {w} is not a finite number")
    rule = METHODS.get(method).extra.get("weight_sum")
    if not rule:
        return
    shown = ", ".join(f"{w:g}" for w in weights)
    if rule == "positive" and any(w < 0 for w in weights):
        i = next(i for i, w in enumerate(weights) if w < 0)
        raise ConfigError(f"models.{i}.weight: {method} takes non-negative weights (a weighted mean); got {shown}")
    if abs(math.fsum(weights)) <= 1e-9 * math.fsum(abs(w) for w in weights) or not any(weights):
        raise ConfigError(f"models' weights ({shown}) sum to zero, but {method} divides by their sum (a weighted "
                          "mean); give weights with a non-zero sum, or use task_arithmetic to add and subtract "
                          "task vectors")


def merge_tensors(method: str, base: Tensor | None, tensors: Sequence[Tensor], params: dict[str, Any] | BaseModel |
                  None = None, weights: Sequence[float] | None = None, *, name: str = "tensor", seed: int = 0,
                  model_params: Sequence[dict[str, Any]] | None = None) -> Tensor:
    """Merge one tensor with a data-free method (pure: the inputs are not modified).

    A two-pass method gets its statistics from this tensor alone (as if the model had one tensor).
    """
    method = canonical_method(method)
    entry, p, mp, w = data_free_setup(method, params, weights, model_params, len(tensors))
    inp = MergeInputs(name, base, list(tensors), w, p, mp, seed)
    passes = passes_of(method, p)
    if passes:
        inp.stats = run_passes(passes, [name], lambda n, st: MergeInputs(n, base, list(tensors), w, p, mp, seed,
                                                                         st)).get(name)
    return entry.build(inp)


def passes_of(method: str, params: BaseModel) -> list[StatsPass]:
    """The statistics passes ``method`` needs before merging with ``params`` (none for most)."""
    return METHODS.get(method).extra.get("passes", no_passes)(params)
