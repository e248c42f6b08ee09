"""Gradient surgery by pairwise projection: PCGrad and Gradient Vaccine, written on the Gramian.

Each projected gradient g_i' is a linear combination of the original gradients, g_i' = sum_m C[i, m] g_m, so the
K x K coefficient matrix C is all that needs tracking: g_i' . g_j = (C G)[i, j] and |g_i'|^2 = (C G C^T)[i, i].
The update sum_i g_i' is J^T w with w = column sums of C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator, gramian_numpy, weights_tensor
from polytask.aggregators._solvers import REL_TOL, normalize
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext


def task_orders(k: int, generator: torch.Generator | None) -> list[list[int]]:
    """For each task i the other tasks in the order they are visited: uniformly random (one draw from
    ``generator``, as the papers' "random order") or, without a generator, ascending."""
    if generator is None:
        return [[j for j in range(k) if j != i] for i in range(k)]
    keys = torch.rand((k, k), generator=generator, device=generator.device, dtype=torch.float64).cpu().numpy()
    return [[int(j) for j in np.argsort(keys[i], kind="stable") if j != i] for i in range(k)]


class PCGradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="combine the projected gradients by their sum (the paper) or their mean"
    )


def pcgrad_weights(g: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Yu et al. 2020, Gradient Surgery for Multi-Task Learning (Alg. 1): for each task i, for j in random
    order, if g_i' . g_j < 0 replace g_i' by g_i' - (g_i' . g_j / |g_j|^2) g_j; return sum_i g_i' as weights."""
    k = len(g)
    gn, scale = normalize(g)
    c = np.eye(k)
    if scale == 0.0:
        return c.sum(axis=0)
    for i in range(k):
        dots = gn[i].copy()  # (C G)[i, :], kept up to date as C[i] changes
        for j in orders[i]:
            if dots[j] < 0.0 and gn[j, j] > REL_TOL:
                coef = dots[j] / gn[j, j]
                c[i, j] -= coef
                dots -= coef * gn[j]
    return c.sum(axis=0)


@aggregator("pcgrad", params=PCGradParams, summary="project each gradient off the gradients it conflicts with",
            paper="Yu, Kumar, Gupta, Levine, Hausman, Finn 2020, Gradient Surgery for Multi-Task Learning (PCGrad)",
            zero_only_if_zero_in_hull=False,
            non_conflicting=False, permutation_invariant=False, scale_equivariant=True, stochastic=True)
def pcgrad(params: PCGradParams, task_names: Sequence[str]) -> Aggregator:
    k = len(task_names)

    def init() -> State:
        return {}

    def update(state: State, g: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        w = pcgrad_weights(gramian_numpy(g), task_orders(k, ctx.generator))
        return weights_tensor(w / k if params.reduction == "mean" else w, g), state

    return Aggregator(init, update)


class GradVacParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(
        0.01, ge=0.0, le=1.0,
        description="EMA rate of the pairwise cosine-similarity targets, phi_hat <- (1-beta) phi_hat + beta phi "
        "(the paper's beta = 1e-2; LibMTL uses 0.5)",
    )


def gradvac_weights(g: np.ndarray, targets: np.ndarray, beta: float,
                    orders: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Wang, Tsvetkov, Firat, Cao 2021, Gradient Vaccine (Alg. 1, whole-model granularity): for each task i and
    j != i in random order, phi = cos(g_i', g_j); if phi < phi_hat_ij add
    |g_i'| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) / (|g_j| sqrt(1-phi_hat^2)) g_j to g_i'; then move the
    target phi_hat_ij toward phi by the EMA. Returns the weights of sum_i g_i' and the new targets."""
    k = len(g)
    gn, scale = normalize(g)
    c = np.eye(k)
    targets = targets.copy()
    if scale == 0.0:
        return c.sum(axis=0), targets
    for i in range(k):
        dots, sq = gn[i].copy(), float(gn[i, i])  # (C G)[i, :] and |g_i'|^2, kept up to date as C[i] changes
        for j in orders[i]:
            ni, nj = math.sqrt(max(sq, 0.0)), math.sqrt(gn[j, j])
            if ni * ni <= REL_TOL or nj * nj <= REL_TOL:
                continue
            phi = min(1.0, max(-1.0, float(dots[j]) / (ni * nj)))
            hat = float(targets[i, j])
            if phi < hat:
                root_hat = math.sqrt(max(1.0 - hat * hat, 1e-12))
                coef = ni * (hat * math.sqrt(1.0 - phi * phi) - phi * root_hat) / (nj * root_hat)
                c[i, j] += coef
                sq += 2.0 * coef * float(dots[j]) + coef * coef * gn[j, j]
                dots += coef * gn[j]
            targets[i, j] = (1.0 - beta) * hat + beta * phi
    return c.sum(axis=0), targets


@aggregator("gradvac", params=GradVacParams,
            summary="raise each pair's gradient cosine similarity to an EMA target (generalises PCGrad)",
            paper="Wang, Tsvetkov, Firat, Cao 2021, Gradient Vaccine: Investigating and Improving Multi-task "
            "Optimization in Massively Multilingual Models",
            zero_only_if_zero_in_hull=False,
            non_conflicting=False, permutation_invariant=False, scale_equivariant=True, stochastic=True)
def gradvac(params: GradVacParams, task_names: Sequence[str]) -> Aggregator:
    k = len(task_names)

    def init() -> State:
        return {"targets": torch.zeros((k, k), dtype=torch.float64)}

    def update(state: State, g: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        targets = state["targets"].detach().to(device="cpu", dtype=torch.float64).numpy()
        w, new = gradvac_weights(gramian_numpy(g), targets, params.beta, task_orders(k, ctx.generator))
        return weights_tensor(w, g), {"targets": torch.from_numpy(new)}

    return Aggregator(init, update)
