"""Gradient aggregators: the per-task gradients of a step -> one update direction.

Most methods are written on the K x K Gramian G = J J^T of the per-task gradients (rows of the K x P
Jacobian J): they return K weights w and the update is J^T w, so the math never touches P-length vectors
or model parameters, and the same method works on parameter gradients (``params`` mode) and on
representation gradients (``representation`` mode). Methods that act per coordinate (GradDrop) take the
Jacobian itself and return the P-vector direction.

An aggregator is an explicit-state ``(init, update)`` pair (optax style):
``update(state, M, ctx) -> (out, state)`` where ``M`` is the float64 Gramian (``input == "gramian"``, out = K
weights) or the Jacobian (``input == "jacobian"``, out = direction of length P). Stateless methods keep
``{}``. ``ctx.losses`` holds the step's K task losses for the methods that need them, ``ctx.grad_dtype`` the
dtype of the gradients the Gramian was built from (for rank tolerances in the gradients' precision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from torch import Tensor

from polytask.methods import METHODS
from polytask.weighting.base import State, StepContext


class Aggregator(NamedTuple):
    """A gradient aggregation method as an explicit-state pair (optax style): ``init() -> state`` and
    ``update(state, M, ctx) -> (out, state)``, where ``input`` says whether ``M`` is the float64 K x K Gramian (out:
    K weights) or the K x P Jacobian (out: the direction); see the module docstring."""
    init: Callable[[], State]
    update: Callable[[State, Tensor, StepContext], tuple[Tensor, State]]
    input: Literal["gramian", "jacobian"] = "gramian"


AggregatorBuilder = Callable[[Any, Sequence[str]], Aggregator]


def register(name: str, **kw: Any) -> Callable[[AggregatorBuilder], AggregatorBuilder]:
    """Register an aggregator in the method registry.

    Extra keys: ``non_conflicting=True`` if the paper guarantees J d >= 0; ``weights_heads=True`` if the
    K weights also scale each task's head gradient (as in GradNorm); otherwise heads get their own task's
    plain gradient.
    """
    return METHODS.register(name, kind="aggregator", **kw)


def stateless(fn: Callable[[Tensor], Tensor], input: Literal["gramian", "jacobian"] = "gramian") -> Aggregator:
    """Wrap a pure function of the Gramian (or Jacobian) as an aggregator with empty state."""

    def init() -> State:
        return {}

    def update(state: State, m: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        return fn(m), state

    return Aggregator(init, update, input)
