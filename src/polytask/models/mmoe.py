"""MMoE: Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong & Chi 2018, KDD, "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts", Section 4.2, the MMoE equations; their numbers are not
given here: the PDF was not readable in this session, and the formulas below are the paper's as quoted by several
secondary sources).

E shared experts f_i and, per task k, a softmax gate and a tower h^k:

    y_k = h^k(f^k(x)),   f^k(x) = sum_i g^k(x)_i f_i(x),   g^k(x) = softmax(W_gk x).

Deliberate differences from the paper:
- the experts and the gates act on the output h of the configured backbone (the shared bottom), not on the raw
  input x; with ``backbone: mlp`` and ``hidden: []`` the backbone is a flatten and this is the paper's model;
- the experts are ReLU MLPs of widths ``expert_hidden`` (the paper's experts are ReLU networks whose size it
  varies per experiment); the towers are the tasks' heads (``task.head.hidden`` Linear+ReLU layers, then a linear
  output layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.models.experts import GatedExperts, StackedExperts, mix
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task

Width = Annotated[int, Field(ge=1, le=65536)]


class MMoEParams(BaseModel):
    """Parameters of ``mmoe``; the defaults are sized for small tabular/vision problems."""

    model_config = ConfigDict(extra="forbid")
    n_experts: int = Field(4, ge=1, le=256, description="number of shared experts (default 4; the paper's synthetic "
                           "study uses 8); 1 expert is a shared bottom with one more layer")
    expert_hidden: list[Width] = Field([64], min_length=1, max_length=8, description="widths of each expert's "
                                       "Linear+ReLU layers; the last is the width the gates mix and the towers read "
                                       "(default [64])")


class MMoE(GatedExperts):
    """Multi-gate mixture-of-experts (Ma et al. 2018, KDD, Section 4.2) on the output h of ``encoder``.

    Shared features: [h, F] with F = (f_1(h) .. f_E(h)) stacked as (N, E, d); every task reads both (its gate
    reads h, its mixture reads F). Shared parameters: the encoder's and the experts'; task k's own: its gate W_gk
    (no bias, as in g^k(x) = softmax(W_gk x)) and its tower."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], n_experts: int,
                 expert_hidden: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.experts = StackedExperts(n_experts, rep_dim, expert_hidden)
        self.gates = nn.ModuleDict({t.name: nn.Linear(rep_dim, n_experts, bias=False) for t in tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, self.experts.out_dim) for t in tasks})
        self.task_names = [t.name for t in tasks]

    def features(self, x: Tensor) -> list[Tensor]:
        """[h, F]: the encoder's output (read by the gates) and every expert's output on it, (N, E, d)."""
        h = self.encoder(x)
        return [h, self.experts(h)]

    def gate(self, task: str, h: Tensor) -> Tensor:
        """g^k(h) = softmax(W_gk h) (the gate of Section 4.2): (N, E) mixture weights of ``task``."""
        return torch.softmax(self.gates[task](h), dim=-1)

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """y_k = h^k(sum_i g^k(h)_i f_i(h)) (Section 4.2) for every task asked."""
        h, experts = features
        return {t: self.heads[t](mix(self.gate(t, h), experts)) for t in (tasks or self.task_names)}



@ARCHITECTURES.register("mmoe", params=MMoEParams,
                        summary="multi-gate mixture-of-experts: shared experts, a softmax gate and a tower per task",
                        paper="Ma et al. 2018, KDD")
def _mmoe(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: MMoEParams) -> MultiTaskModel:
    return MMoE(encoder, rep_dim, tasks, params.n_experts, params.expert_hidden)
