"""Optimisers and learning-rate schedulers by name: each registry entry turns its typed parameters into a factory.

The engine receives factories, not names: ``OptimizerFactory(parameters) -> Optimizer`` (called once the model
is on its device) and ``SchedulerFactory(optimizer, epochs) -> LRScheduler`` (stepped once per epoch). A user
may pass any callable of the same shape (e.g. ``lambda p: torch.optim.RMSprop(p, lr=1e-3)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from polytask.config import FUSED
from polytask.registry import Registry

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]

OPTIMIZERS: Registry[Callable[[Any], OptimizerFactory]] = Registry("optimizer")
SCHEDULERS: Registry[Callable[[Any], SchedulerFactory | None]] = Registry("scheduler")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SGDParams(_Params):
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    fused: bool = Field(False, description=FUSED)


class AdamParams(_Params):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    fused: bool = Field(False, description=FUSED)


class StepParams(_Params):
    step_size: int = Field(10, ge=1, description="epochs between decays")
    gamma: float = Field(0.1, gt=0, description="decay factor")


@OPTIMIZERS.register("sgd", params=SGDParams, summary="SGD with (heavy-ball) momentum and L2 weight decay")
def _sgd(p: SGDParams) -> OptimizerFactory:
    return lambda params: torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay,
                                          fused=p.fused or None)


@OPTIMIZERS.register("adam", params=AdamParams, summary="Adam (Kingma & Ba 2015), L2 weight decay")
def _adam(p: AdamParams) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay, fused=p.fused or None)


@OPTIMIZERS.register("adamw", params=AdamParams, summary="AdamW (Loshchilov & Hutter 2019), decoupled weight decay")
def _adamw(p: AdamParams) -> OptimizerFactory:
    return lambda params: torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, fused=p.fused or None)


@SCHEDULERS.register("none", summary="constant learning rate")
def _none(p: BaseModel) -> None:
    return None


@SCHEDULERS.register("cosine", summary="cosine annealing to zero over the run's epochs")
def _cosine(p: BaseModel) -> SchedulerFactory:
    return lambda opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


@SCHEDULERS.register("step", params=StepParams, summary="multiply the rate by gamma every step_size epochs")
def _step(p: StepParams) -> SchedulerFactory:
    return lambda opt, epochs: torch.optim.lr_scheduler.StepLR(opt, step_size=p.step_size, gamma=p.gamma)


def _known(registry: Registry[Any], name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` restricted to the keys entry ``name`` takes (a config section holds every entry's keys)."""
    fields = registry.get(name).params.model_fields
    return {k: v for k, v in params.items() if k in fields}


def optimizer(name: str, params: dict[str, Any] | None = None, where: str = "optimizer",
              ignore_unknown: bool = False) -> OptimizerFactory:
    """The factory of the registered optimiser ``name`` (errors name ``where``); ``ignore_unknown`` drops keys the
    entry does not take (a config section that holds the keys of every optimiser)."""
    params = params or {}
    return OPTIMIZERS.build(name, _known(OPTIMIZERS, name, params) if ignore_unknown else params,
                            where=where)


def scheduler(name: str, params: dict[str, Any] | None = None, where: str = "scheduler",
              ignore_unknown: bool = False) -> SchedulerFactory | None:
    """The factory of the registered scheduler ``name`` (None for a constant rate)."""
    params = params or {}
    return SCHEDULERS.build(name, _known(SCHEDULERS, name, params) if ignore_unknown else params,
                            where=where)
