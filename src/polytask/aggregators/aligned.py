"""Aligned-MTL: align the task gradients into an orthogonal system of equal norms (condition number 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from polytask.aggregators._common import aggregator, numpy_stateless
from polytask.aggregators._solvers import normalize
from polytask.aggregators.base import Aggregator

FLOAT32_EPS = float(np.finfo(np.float32).eps)
"""The official code's rank tolerance uses torch.finfo().eps of the default (float32) dtype."""


class AlignedMTLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale_mode: Literal["min", "median", "rmse"] = Field(
        "min", description="scale of the aligned gradients: sqrt of the smallest eigenvalue of G (the paper's "
        "default), of the (lower) median eigenvalue, or of the mean eigenvalue ('rmse')",
    )


def aligned_mtl_weights(g: np.ndarray, scale_mode: str = "min") -> np.ndarray:
    """Senushkin, Patakin, Kuznetsov, Konushin 2023, Independent Component Alignment for Multi-Task Learning
    (Aligned-MTL, Alg. 1): with G = V diag(lambda) V^T (eigenvalues above lambda_max K eps kept, as the official
    code), the aligned gradients are the rows of W J with W = sqrt(sigma) V diag(lambda^-1/2) V^T, sigma the
    chosen scale; the update is their sum, so the weights are W 1."""
    k = len(g)
    gn, scale = normalize(g)
    if scale == 0.0:
        return np.zeros(k)
    lam, vec = np.linalg.eigh(gn)
    keep = lam > lam.max() * k * FLOAT32_EPS
    lam, vec = lam[keep], vec[:, keep]
    sigma = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2], "rmse": lam.mean()}[scale_mode]
    return (vec * np.sqrt(sigma / lam)) @ (vec.T @ np.ones(k))


@aggregator("aligned_mtl", params=AlignedMTLParams,
            summary="sum of the gradients after aligning them to equal-norm orthogonal components",
            paper="Senushkin, Patakin, Kuznetsov, Konushin 2023, Independent Component Alignment for Multi-Task "
            "Learning (Aligned-MTL)",
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def aligned_mtl(params: AlignedMTLParams, task_names: Sequence[str]) -> Aggregator:
    return numpy_stateless(lambda g: aligned_mtl_weights(g, params.scale_mode))
