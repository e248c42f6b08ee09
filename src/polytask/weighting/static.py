"""Fixed weights: equal (the plain summed loss) and user-given static weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from polytask.errors import ConfigError
from polytask.registry import suggest
from polytask.weighting.base import State, StepContext, Weighting, register


def _fixed(weights: torch.Tensor) -> Weighting:
    def init() -> State:
        return {}

    def update(state: State, losses: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, State]:
        return weights.to(losses.device, losses.dtype), state

    return Weighting(init, update, fixed=weights)


@register("equal", summary="every task weight 1: minimise the sum of the task losses",
                     paper="the standard multi-task baseline (e.g. Caruana 1997)")
def equal(params: BaseModel, task_names: Sequence[str]) -> Weighting:
    return _fixed(torch.ones(len(task_names)))


class StaticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float] = Field(description="weight of each task, by name; every task must be named")


@register("static", params=StaticParams, summary="fixed user-chosen weight per task",
                     paper="the static weighting baseline (e.g. Kendall et al. 2018, grid-searched weights)")
def static(params: StaticParams, task_names: Sequence[str]) -> Weighting:
    unknown = [k for k in params.weights if k not in task_names]
    if unknown:
        raise ConfigError(f"methods.static.weights: unknown task {unknown[0]!r}{suggest(unknown[0], task_names)}")
    missing = [t for t in task_names if t not in params.weights]
    if missing:
        raise ConfigError(f"methods.static.weights: no weight for task {missing[0]!r}")
    if any(w < 0 for w in params.weights.values()):
        raise ConfigError("methods.static.weights: weights must be >= 0")
    return _fixed(torch.tensor([params.weights[t] for t in task_names]))
