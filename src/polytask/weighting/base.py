"""Loss weightings as explicit-state ``(init, update)`` pairs (optax style).

``update(state, losses, ctx)`` maps the K per-task losses of a step (detached) to K weights and the next
state; the training loop then minimises ``sum_k w_k * L_k``. State is a tree of tensors and numbers, so it
is checkpointed with the run and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel
from torch import Tensor

from polytask.methods import METHODS

State = dict[str, Any]


@dataclass(frozen=True)
class StepContext:
    """What a method may know about the step besides its main input.

    ``losses``: the K task losses of the step (detached). ``val_losses``: a callable returning the K task
    losses on a validation batch (for methods that watch validation, like CoBa); None when unavailable.
    ``generator``: a torch.Generator seeded from (run seed, step), for methods that draw random numbers
    (RLW, DARE-like dropping), so no RNG state needs to be threaded through. ``grad_dtype``: the dtype of the
    per-task gradients behind an aggregator's (always float64) Gramian, for methods whose rank tolerance
    follows the gradients' precision (Aligned-MTL); None means float64.
    """

    step: int
    epoch: int
    losses: Tensor | None = None
    val_losses: Callable[[], Tensor] | None = None
    steps_per_epoch: int = 1
    generator: torch.Generator | None = None
    grad_dtype: torch.dtype | None = None


class Weighting(NamedTuple):
    """``update(state, losses, ctx) -> (weights, state)``; optional ``after_step(state, new_losses, ctx)``
    receives the losses recomputed on the same batch after the optimiser step (FAMO) and returns the state.
    ``fixed``: the weights, when ``update`` always returns them and leaves the state as it is (equal, static): the
    engine may then skip the call."""

    init: Callable[[], State]
    update: Callable[[State, Tensor, StepContext], tuple[Tensor, State]]
    after_step: Callable[[State, Tensor, StepContext], State] | None = None
    fixed: Tensor | None = None


WeightingBuilder = Callable[[Any, Sequence[str]], Weighting]


def register(name: str, **kw: Any) -> Callable[[WeightingBuilder], WeightingBuilder]:
    """Register a weighting in the method registry."""
    return METHODS.register(name, kind="weighting", **kw)


def build_weighting(name: str, params: dict | BaseModel | None, task_names: Sequence[str]) -> Weighting:
    """Build weighting ``name`` for the tasks ``task_names``."""
    return METHODS.build(name, params, list(task_names), where=f"methods.{name}.params")
