"""Aligned-MTL: align the task gradients into an orthogonal system of equal norms (condition number 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.aggregators._common import aggregator, gramian_numpy, weights_tensor
from polytask.aggregators._solvers import normalize
from polytask.aggregators.base import Aggregator
from polytask.weighting.base import State, StepContext

FLOAT32_EPS = float(np.finfo(np.float32).eps)
"""The official code's epsilon: torch.finfo().eps of the default (float32) dtype, whatever the input."""


class AlignedMTLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale_mode: Literal["min", "median", "rmse"] = Field(
        "min", description="scale of the aligned gradients: sqrt of the smallest eigenvalue of G (the paper's "
        "default), of the (lower) median eigenvalue, or of the mean eigenvalue ('rmse')",
    )
    rank_eps: Literal["input", "float32"] = Field(
        "input", description="epsilon of the rank tolerance lambda_max K eps: the gradients' dtype ('input', "
        "default; float32 gradients get the official value) or always float32, as the official code "
        "(torch.finfo() of the default dtype), which drops real directions of float64 gradients",
    )


def aligned_mtl_weights(g: np.ndarray, scale_mode: str = "min", eps: float = FLOAT32_EPS) -> np.ndarray:
    """Senushkin, Patakin, Kuznetsov, Konushin 2023, Independent Component Alignment for Multi-Task Learning
    (Aligned-MTL, Alg. 1): with G = V diag(lambda) V^T (eigenvalues above lambda_max K eps kept, as the official
    code), the aligned gradients are the rows of W J with W = sqrt(sigma) V diag(lambda^-1/2) V^T, sigma the
    chosen scale; the update is their sum, so the weights are W 1.

    ``eps`` is the machine epsilon of the gradients (the aggregator passes the input dtype's, see
    ``AlignedMTLParams.rank_eps``): the official code uses float32's for every input, which on float64
    gradients with spread norms cuts eigenvalues that are real (cosine 0.3-0.8 to the float64 answer)."""
    k = len(g)
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.zeros(k)
    lam, vec = np.linalg.eigh(gn)
    keep = lam > lam.max() * k * eps
    lam, vec = lam[keep], vec[:, keep]
    sigma = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2], "rmse": lam.mean()}[scale_mode]
    return (vec * np.sqrt(sigma / lam)) @ (vec.T @ np.ones(k))


@aggregator("aligned_mtl", params=AlignedMTLParams,
            summary="sum of the gradients after aligning them to equal-norm orthogonal components",
            paper="Senushkin, Patakin, Kuznetsov, Konushin 2023, Independent Component Alignment for Multi-Task "
            "Learning (Aligned-MTL)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def aligned_mtl(params: AlignedMTLParams, task_names: Sequence[str]) -> Aggregator:
    def init() -> State:
        return {}

    def update(state: State, g: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        dtype = torch.float32 if params.rank_eps == "float32" else (ctx.grad_dtype or torch.float64)
        eps = torch.finfo(dtype).eps
        return weights_tensor(aligned_mtl_weights(gramian_numpy(g), params.scale_mode, eps), g), state

    return Aggregator(init, update)
