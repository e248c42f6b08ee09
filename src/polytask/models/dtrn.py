"""DTRN: task-specific bottom representations (Liu, Zhou, Jiang, Ge & Lian 2023, CIKM, "Deep Task-specific Bottom
Representation Network for Multi-Task Recommendation", arXiv:2308.05996), on a generic encoder's output.

Two modules give every task its own bottom representation before its tower: the Task-specific Interest Module (TIM),
whose interest extractor has parameters generated per task by a shared hypernetwork from a learned task embedding
(parameter-efficient: one hypernetwork instead of one extractor per task), and the Task-specific Representation
Refinement Module (TRM), a SENet-like gate per task that re-weights each feature of the bottom representation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.models.backbones import _mlp_layers
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task


def task_interests(h: Tensor, generated: Tensor, interest_dim: int) -> Tensor:
    """TIM on a flat representation: every task's interest u_t = ReLU(h W_t + b_t), with [vec(W_t); b_t] row t of
    the hypernetwork's ``generated`` parameters (K, rep_dim * interest_dim + interest_dim). Returns (N, K,
    interest_dim); all tasks in one einsum."""
    k, rep_dim = generated.shape[0], h.shape[1]
    w = generated[:, :rep_dim * interest_dim].reshape(k, rep_dim, interest_dim)
    b = generated[:, rep_dim * interest_dim:]
    return torch.relu(torch.einsum("nd,kdu->nku", h, w) + b)


class DTRNParams(BaseModel):
    """Parameters of ``dtrn``; the defaults are sized for small tabular/vision problems."""

    model_config = ConfigDict(extra="forbid")
    embedding_dim: int = Field(8, ge=1, le=4096, description="width of each task's learned embedding, the "
                               "hypernetwork's input")
    interest_dim: int = Field(32, ge=1, le=65536, description="width of each task's interest representation u_t "
                              "(the TIM output appended to the encoder output)")
    hyper_hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        [], max_length=8, description="hidden widths (Linear+ReLU) of the hypernetwork; empty: a linear map "
        "from task embedding to interest-extractor parameters (a shared base plus a task-specific offset)")
    reduction: int = Field(4, ge=1, le=1024, description="SENet reduction ratio r of each task's TRM gate: "
                           "bottleneck width ceil((rep_dim + interest_dim) / r)")


class DTRN(MultiTaskModel):
    """Deep Task-specific Bottom Representation Network (Liu, Zhou, Jiang, Ge & Lian 2023, CIKM,
    arXiv:2308.05996), adapted to a generic encoder.

    h = encoder(x). TIM: [vec(W_t); b_t] = H(e_t), a shared hypernetwork H of task t's learned embedding e_t;
    u_t = ReLU(h W_t + b_t). TRM: z_t = [h; u_t], alpha_t = sigmoid(A_t ReLU(B_t z_t + c_t) + d_t) (SENet's
    excitation, one gate per task), r_t = alpha_t * z_t (element-wise). y_t = tower_t(r_t).

    The paper's equations could not be read here (only its abstract and a summary of Fig. 2: TIM, TRM); the
    modules follow that description and are not matched to its equation numbers. Adaptation to a generic encoder
    (deliberate differences): (1) the paper's TIM extracts interests from several user-behaviour sequences by
    attention with a generator input per (task, behaviour type); a generic encoder gives no sequences, so there
    is one "behaviour", the encoder output h, and the generated extractor is one dense ReLU layer on it; (2) the
    paper's features are the recommender's field embeddings; here every coordinate of [h; u_t] is one feature
    (SENet's channel), so the squeeze step is the identity and the gate is element-wise; (3) the sigmoid gate is
    SENet's (Hu et al. 2018); (4) the towers sit directly on r_t (DTRN's combination with MMoE/PLE on top is not
    built); (5) initialisation (not given in what was read): e_t ~ N(0, 1); the hypernetwork's output bias is a
    dense layer's init (uniform +-1/sqrt(rep_dim)) and its output weights that divided by sqrt(fan_in), so the
    task-specific offsets start at the base weights' scale.

    Features: ``[h, U]`` with U = (N, K, interest_dim) every task's interest; task t reads h and U[:, t]. The
    encoder, the hypernetwork and the task embeddings (one (K, embedding_dim) tensor: each task's loss reaches only
    its row, but the tensor is below the features with the hypernetwork it feeds) are shared; the TRM gate and the
    tower of task t are t's own. ``aux_loss``: none (the paper has none)."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: DTRNParams) -> None:
        super().__init__()
        self.encoder = encoder
        self.interest_dim = params.interest_dim
        self.task_names = [t.name for t in tasks]
        self.task_embeddings = nn.Parameter(torch.randn(len(tasks), params.embedding_dim))
        n_generated = rep_dim * params.interest_dim + params.interest_dim
        layers = _mlp_layers(params.embedding_dim, list(params.hyper_hidden), 0.0)
        last = params.hyper_hidden[-1] if params.hyper_hidden else params.embedding_dim
        out = nn.Linear(last, n_generated)
        bound = 1.0 / math.sqrt(rep_dim)
        with torch.no_grad():
            out.bias.uniform_(-bound, bound)
            out.weight.uniform_(-bound / math.sqrt(last), bound / math.sqrt(last))
        self.hypernetwork = nn.Sequential(*layers, out)
        width = rep_dim + params.interest_dim
        squeeze = math.ceil(width / params.reduction)
        self.gates = nn.ModuleDict({t.name: nn.Sequential(nn.Linear(width, squeeze), nn.ReLU(),
                                                          nn.Linear(squeeze, width), nn.Sigmoid()) for t in tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, width) for t in tasks})

    def features(self, x: Tensor) -> list[Tensor]:
        """``[h, U]``: the encoder output (N, rep_dim) and every task's interest (N, K, interest_dim)."""
        h = self.encoder(x)
        return [h, task_interests(h, self.hypernetwork(self.task_embeddings), self.interest_dim)]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """y_t = tower_t(alpha_t * [h; u_t]) for each task t asked for."""
        h, interests = features
        out = {}
        for t in tasks or self.task_names:
            z = torch.cat([h, interests[:, self.task_names.index(t)]], dim=1)
            out[t] = self.heads[t](self.gates[t](z) * z)
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's, the hypernetwork's and the task embeddings' trainable parameters (below the features)."""
        yield from (p for m in (self.encoder, self.hypernetwork) for p in m.parameters() if p.requires_grad)
        if self.task_embeddings.requires_grad:
            yield self.task_embeddings

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Task ``task``'s TRM gate and tower."""
        yield from self.gates[task].parameters()
        yield from self.heads[task].parameters()


@ARCHITECTURES.register("dtrn", params=DTRNParams,
                        summary="task-specific bottom representations: a hypernetwork-generated interest layer per "
                                "task (TIM) and a SENet-like gate per task (TRM) before each tower",
                        paper="Liu, Zhou, Jiang, Ge & Lian 2023, CIKM")
def _dtrn(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: DTRNParams) -> MultiTaskModel:
    return DTRN(encoder, rep_dim, tasks, params)
