"""Scale baselines: the mean and the sum of the task gradients (plain joint training)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel
from torch import Tensor

from polytask.aggregators._common import aggregator
from polytask.aggregators.base import Aggregator, stateless


def mean_weights(g: Tensor) -> Tensor:
    """w = 1/K: the direction is the average gradient, the gradient of mean_k L_k (e.g. Caruana 1997)."""
    k = g.shape[0]
    return torch.full((k,), 1.0 / k, dtype=torch.float64, device=g.device)


def sum_weights(g: Tensor) -> Tensor:
    """w = 1: the direction is the summed gradient, the gradient of sum_k L_k (e.g. Caruana 1997)."""
    return torch.ones(g.shape[0], dtype=torch.float64, device=g.device)


@aggregator("mean", summary="average of the task gradients (gradient of the mean loss)",
            paper="joint-training baseline (Caruana 1997, Multitask Learning)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def mean(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return stateless(mean_weights)


@aggregator("sum", summary="sum of the task gradients (gradient of the summed loss)",
            paper="joint-training baseline (Caruana 1997, Multitask Learning)",
            zero_only_if_zero_in_hull=True,
            non_conflicting=False, permutation_invariant=True, scale_equivariant=True)
def sum_(params: BaseModel, task_names: Sequence[str]) -> Aggregator:
    return stateless(sum_weights)
