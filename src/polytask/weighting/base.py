"""Loss weightings as explicit-state ``(init, update)`` pairs (optax style).

``update(state, losses, ctx)`` maps the K per-task losses of a step (detached) to K weights and the next
state; the training loop then minimises ``sum_k w_k * L_k``. State is a tree of tensors and numbers, so it
is checkpointed with the run and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel
from torch import Tensor

from polytask.methods import METHODS

State = dict[str, Any]


@dataclass(frozen=True)
class StepContext:
    """What a weighting may know about the step besides the losses."""

    step: int
    epoch: int


class Weighting(NamedTuple):
    init: Callable[[], State]
    update: Callable[[State, Tensor, StepContext], tuple[Tensor, State]]


WeightingBuilder = Callable[[Any, Sequence[str]], Weighting]


def register(name: str, **kw: Any) -> Callable[[WeightingBuilder], WeightingBuilder]:
    """Register a weighting in the method registry."""
    return METHODS.register(name, kind="weighting", **kw)


def build_weighting(name: str, params: dict | BaseModel | None, task_names: Sequence[str]) -> Weighting:
    """Build weighting ``name`` for the tasks ``task_names``."""
    return METHODS.build(name, params, list(task_names), where=f"methods.{name}.params")
