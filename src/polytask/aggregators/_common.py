"""Wiring shared by the aggregator modules: registration with input checks, numpy <-> torch for the K x K
math, and ``aggregate`` (Jacobian -> direction) for callers and tests.

The math of each method lives in its own module; nothing here knows about any method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor

from polytask.aggregators.base import Aggregator, AggregatorBuilder, register, stateless
from polytask.methods import METHODS
from polytask.registry import NoParams
from polytask.weighting.base import State, StepContext


def aggregator(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    summary: str,
    paper: str,
    non_conflicting: bool,
    permutation_invariant: bool,
    scale_equivariant: bool,
    zero_only_if_zero_in_hull: bool,
    **extra: Any,
) -> Callable[[AggregatorBuilder], AggregatorBuilder]:
    """Register an aggregator whose ``update`` first checks its input (shape, NaN/inf) and names itself.

    Declared properties (tested by the shared property suite): ``non_conflicting`` (J d >= 0 for every input,
    as the paper guarantees), ``permutation_invariant`` (reordering the tasks leaves d unchanged),
    ``scale_equivariant`` (d(aJ) = a d(J) for a > 0), ``zero_only_if_zero_in_hull`` (d = 0 only when 0 is a
    convex combination of the task gradients, i.e. no common descent direction exists: a method that may stop
    when a common descent direction exists, on any input including rank-deficient ones, declares False).
    Optional extras: ``non_conflicting_if_independent``
    (J d >= 0 whenever the gradients are linearly independent), ``needs_losses`` (reads ``ctx.losses``),
    ``stochastic`` (draws from ``ctx.generator``), ``weights_heads`` (see ``base.register``).
    """

    def deco(builder: AggregatorBuilder) -> AggregatorBuilder:
        def build(p: Any, task_names: Sequence[str]) -> Aggregator:
            return _checked(name, builder(p, task_names), len(task_names))

        register(
            name,
            params=params,
            summary=summary,
            paper=paper,
            non_conflicting=non_conflicting,
            permutation_invariant=permutation_invariant,
            scale_equivariant=scale_equivariant,
            zero_only_if_zero_in_hull=zero_only_if_zero_in_hull,
            **extra,
        )(build)
        return build

    return deco


def _checked(name: str, agg: Aggregator, k: int) -> Aggregator:
    """``agg`` with an ``update`` that rejects a wrongly shaped or non-finite input with a clear ValueError."""
    what = "Gramian" if agg.input == "gramian" else "Jacobian"

    def update(state: State, m: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        cols = k if agg.input == "gramian" else m.shape[-1] if m.dim() == 2 else -1
        if m.dim() != 2 or m.shape[0] != k or m.shape[1] != cols:
            expected = f"{k} x {k}" if agg.input == "gramian" else f"{k} x P"
            raise ValueError(f"aggregator {name!r}: expected a {expected} {what}, got shape {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(
                f"aggregator {name!r}: the {what} contains NaN or inf (a task loss or gradient diverged); "
                "check the losses of this step or lower the learning rate"
            )
        return agg.update(state, m, ctx)

    return Aggregator(agg.init, update, agg.input)


def gramian_numpy(g: Tensor) -> np.ndarray:
    """The Gramian as a float64 numpy array (one host transfer per step)."""
    return g.detach().to(device="cpu", dtype=torch.float64).numpy()


def weights_tensor(w: np.ndarray, like: Tensor) -> Tensor:
    """K weights back as a float64 tensor on the Gramian's device."""
    return torch.as_tensor(np.asarray(w, dtype=np.float64), device=like.device)


def numpy_stateless(fn: Callable[[np.ndarray], np.ndarray]) -> Aggregator:
    """A stateless Gramian aggregator from a float64 numpy function G -> weights."""
    return stateless(lambda g: weights_tensor(fn(gramian_numpy(g)), g))


def build_aggregator(name: str, params: dict | BaseModel | None, task_names: Sequence[str]) -> Aggregator:
    """Build aggregator ``name`` for the tasks ``task_names`` (params validated, errors name the key)."""
    entry = METHODS.get(name)
    if entry.extra.get("kind") != "aggregator":
        raise ValueError(f"method {name!r} is a {entry.extra.get('kind')}, not a gradient aggregator")
    return METHODS.build(name, params, list(task_names), where=f"methods.{name}.params")


def aggregate(
    name_or_aggregator: str | Aggregator,
    jacobian: Tensor,
    params: dict | BaseModel | None = None,
    state: State | None = None,
    ctx: StepContext | None = None,
) -> tuple[Tensor, State]:
    """Aggregate the K x P Jacobian into one direction of length P; returns ``(direction, state)``.

    Gramian methods get G = J J^T computed in float64 (``ctx.grad_dtype`` set to J's dtype, as the training
    step does) and return weights w; the direction is J^T w in J's dtype. Jacobian methods return the
    direction directly. ``state`` defaults to a fresh ``init()`` and ``ctx`` to step 0 without losses or
    generator.
    """
    label = name_or_aggregator if isinstance(name_or_aggregator, str) else "aggregator"
    if jacobian.dim() != 2:
        raise ValueError(f"aggregator {label!r}: expected a K x P Jacobian, got shape {tuple(jacobian.shape)}")
    if not bool(torch.isfinite(jacobian).all()):
        raise ValueError(f"aggregator {label!r}: the Jacobian contains NaN or inf")
    k = jacobian.shape[0]
    agg = (
        build_aggregator(name_or_aggregator, params, [f"task{i}" for i in range(k)])
        if isinstance(name_or_aggregator, str)
        else name_or_aggregator
    )
    state = agg.init() if state is None else state
    ctx = StepContext(step=0, epoch=0) if ctx is None else ctx
    if agg.input == "jacobian":
        return agg.update(state, jacobian, ctx)
    j64 = jacobian.detach().to(torch.float64)
    w, state = agg.update(state, j64 @ j64.T, replace(ctx, grad_dtype=jacobian.dtype))
    return w.to(device=jacobian.device, dtype=jacobian.dtype) @ jacobian, state
