"""Nash-MTL and FairGrad: weights solving G w = w^(-1/alpha), the alpha-fair allocation of the update.

Both solve the same K x K fixed point (Nash-MTL is FairGrad with alpha = 1, proportional fairness) with the
iteration-bounded Newton solver ``power_fixed_point`` on the trace-normalised Gramian G / s; the solution of the
raw equation is w = w_n s^(-alpha/(1+alpha)), so the direction d(aJ) = a^((1-alpha)/(1+alpha)) d(J): these
methods are not linear under scaling (Nash-MTL's direction does not change at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator, gramian_numpy, numpy_stateless, weights_tensor
from polytask.aggregators._solvers import normalize, power_fixed_point
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext


def alpha_fair_weights(g: np.ndarray, alpha: float) -> np.ndarray:
    """Ban & Ji 2024, Fair Resource Allocation in Multi-Task Learning (FairGrad, Eq. 8): the w > 0 with
    (G w)_i = w_i^(-1/alpha), i.e. each task's improvement g_i . d equals w_i^(-1/alpha) for d = J^T w."""
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.zeros(len(g))
    p = 1.0 / alpha
    return power_fixed_point(gn, p) * scale ** (-1.0 / (1.0 + p))


def nash_mtl_weights(g: np.ndarray) -> np.ndarray:
    """Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya 2022, Multi-Task Learning as a Bargaining
    Game (Nash-MTL, Thm 5.1): the Nash bargaining solution is d = J^T alpha with G alpha = 1/alpha, alpha > 0.
    The official code solves it by CCP with cvxpy on G / |G|_F with the normalisation undone in the
    constraints, i.e. the raw equation, which is solved here."""
    return alpha_fair_weights(g, 1.0)


class NashMTLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    update_weights_every: int = Field(
        1, ge=1, description="solve for the weights every n steps and reuse the last ones in between (the paper's "
        "speed-up; 1 = every step)",
    )
    max_norm: float = Field(
        0.0, ge=0.0, description="clip the update to this norm when > 0 (the official code clips the shared "
        "gradient to 1.0; off by default here so the aggregator stays a pure function of the gradients)",
    )


@aggregator("nashmtl", params=NashMTLParams, summary="Nash bargaining solution: G alpha = 1/alpha",
            paper="Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya 2022, Multi-Task Learning as a "
            "Bargaining Game (Nash-MTL)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, non_conflicting_if_independent=True, permutation_invariant=True,
            scale_equivariant=False, weights_heads=True)
def nashmtl(params: NashMTLParams, task_names: Sequence[str]) -> Aggregator:
    k = len(task_names)

    def init() -> State:
        return {"step": 0, "alpha": torch.zeros(k, dtype=torch.float64)}

    def update(state: State, g: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        gram = gramian_numpy(g)
        step = int(state["step"])
        if step % params.update_weights_every == 0:
            alpha = nash_mtl_weights(gram)
        else:
            alpha = state["alpha"].detach().to(device="cpu", dtype=torch.float64).numpy()
        out = alpha
        norm = math.sqrt(max(float(alpha @ gram @ alpha), 0.0))
        if params.max_norm > 0.0 and norm > params.max_norm:
            out = alpha * (params.max_norm / norm)
        return weights_tensor(out, g), {"step": step + 1, "alpha": torch.from_numpy(np.array(alpha))}

    return Aggregator(init, update)


class FairGradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(
        1.0, gt=0.0, description="fairness: 1 is proportional fairness (= Nash-MTL), -> 0 utilitarian, "
        "-> infinity max-min fairness",
    )


@aggregator("fairgrad", params=FairGradParams, summary="alpha-fair allocation: G w = w^(-1/alpha)",
            paper="Ban & Ji 2024, Fair Resource Allocation in Multi-Task Learning (FairGrad)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, non_conflicting_if_independent=True, permutation_invariant=True,
            scale_equivariant=False)
def fairgrad(params: FairGradParams, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(lambda g: alpha_fair_weights(g, params.alpha))
