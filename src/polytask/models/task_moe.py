"""Task-MoE: a sparse mixture of experts routed by task (Kudugunta, Huang, Bapna, Krikun, Lepikhin, Luong & Firat
2021, Findings of EMNLP, "Beyond Distillation: Task-level Mixture-of-Experts for Efficient Inference").

Every example of task t goes to the same top-k experts, chosen from task-level router logits l_t in R^E (the
paper's gate on the task id: a linear map of the task's one-hot code is exactly one logit vector per task):

    p_t = softmax(l_t),   K_t = top-k(p_t),   y_t = tower_t( sum_{e in K_t} w_{t,e} f_e(h) ),

with w_t = softmax of l_t over K_t (Shazeer et al. 2017, ICLR, Eqs. 3 and 5: Softmax(KeepTopK(.)); the normalised
top-2 gate of GShard, Lepikhin et al. 2021, that the paper uses), or ``renormalize: false``: w_{t,e} = p_{t,e}
(Switch, Fedus et al. 2022, JMLR, Eq. 2, which keeps a gradient to the router at k = 1). Because routing depends on
the task only, each task's sub-network (its k experts and tower) can be extracted for inference, the paper's point;
the equation numbers of Shazeer et al. and Fedus et al. are as recalled, not re-checked against the PDFs here.

Load balancing (``aux_loss()``, coefficient ``balance_coef``), computed over the tasks' routing distributions,
which are parameters, so it needs no activations:
- ``switch`` (Fedus et al. 2022, JMLR, Eq. 4): E * sum_e f_e P_e with f_e the share of the tasks' k routing slots
  that go to e (not differentiable) and P_e = mean_t p_{t,e};
- ``importance`` (Shazeer et al. 2017, ICLR, Eqs. 6-7): CV(Importance)^2 with Importance_e = sum_t w_{t,e} (the
  coefficient of variation with the population standard deviation).

Deliberate differences:
- the experts act on the output h of the configured backbone (the paper's experts are transformer feed-forward
  blocks inside every MoE layer of the model; here one mixture layer sits on the shared bottom); the experts are
  ReLU MLPs of widths ``expert_hidden``; the towers are the tasks' heads;
- the balance statistics weigh every task equally (the paper's token-level statistics weigh a task by its share of
  the batch's tokens: that would depend on the batch); the capacity factor and token dropping of GShard do not
  apply (all of a task's examples go to its experts); Shazeer et al.'s noisy gating and its load loss are left out
  (routing is deterministic);
- the router logits start at 0 with +1 on k experts chosen round robin (task j prefers experts jk .. jk + k - 1
  mod E), so every expert is routed to at the start when tasks * k >= E (the paper's router starts from a random
  initialisation): the start is deterministic, and no expert is dead from the first step;
- ties in the top-k take the lower expert index (a stable sort), so routing is a deterministic function of the
  parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.experts import StackedExperts
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task

Width = Annotated[int, Field(ge=1, le=65536)]
#: the router logit added to a task's round-robin experts at initialisation
START_PREFERENCE = 1.0


def top_k(logits: Tensor, k: int) -> Tensor:
    """The indices of the k largest logits, largest first; ties go to the lower index (a stable sort)."""
    return torch.sort(logits, descending=True, stable=True).indices[:k]


def route_weights(logits: Tensor, chosen: Tensor, renormalize: bool) -> Tensor:
    """The weights of the ``chosen`` experts: softmax of their logits (``renormalize``), else their share
    softmax(logits)[chosen] of the full distribution."""
    if renormalize:
        return torch.softmax(logits[chosen], dim=-1)
    return torch.softmax(logits, dim=-1)[chosen]


def switch_balance(probs: Tensor, chosen: Tensor) -> Tensor:
    """Fedus et al. 2022 (Eq. 4) over T routers: E * sum_e f_e P_e, ``probs`` (T, E) the routing distributions,
    ``chosen`` (T, k) the experts each router picks; f_e = share of the T*k slots on e, P_e = mean_t probs[t, e]."""
    n_experts = probs.shape[1]
    counts = torch.zeros(n_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=probs.dtype, device=probs.device))
    return n_experts * torch.dot(counts / chosen.numel(), probs.mean(0))


def importance_balance(weights: Tensor) -> Tensor:
    """Shazeer et al. 2017 (Eqs. 6-7): CV(Importance)^2, Importance_e = sum_t weights[t, e] (``weights`` (T, E), zero
    off each task's experts); population variance."""
    importance = weights.sum(0)
    return importance.var(unbiased=False) / importance.mean() ** 2


def round_robin(n_tasks: int, n_experts: int, k: int) -> Tensor:
    """(T, E) router logits at initialisation: 0, and START_PREFERENCE on experts jk .. jk + k - 1 (mod E) for
    task j."""
    logits = torch.zeros(n_tasks, n_experts)
    for j in range(n_tasks):
        logits[j, [(j * k + i) % n_experts for i in range(k)]] = START_PREFERENCE
    return logits


class TaskMoE(MultiTaskModel):
    """Experts on the encoder's output h, routed per task (Kudugunta et al. 2021).

    Shared features: one tensor f_e(h) per expert that some task routes to (in expert order); task t reads its k
    experts' tensors. Only those experts are computed. Shared parameters: the encoder's and every expert's (any
    task's router may pick any expert, so no expert is a task's own); task t's own: its router logits and tower."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], n_experts: int, k: int,
                 expert_hidden: Sequence[int], renormalize: bool, balance: str, balance_coef: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.experts = StackedExperts(n_experts, rep_dim, expert_hidden)
        start = round_robin(len(tasks), n_experts, k)
        self.routers = nn.ParameterDict({t.name: nn.Parameter(start[j].clone()) for j, t in enumerate(tasks)})
        self.heads = nn.ModuleDict({t.name: make_head(t, self.experts.out_dim) for t in tasks})
        self.task_names = [t.name for t in tasks]
        self.k, self.renormalize = k, renormalize
        self.balance, self.balance_coef = balance, balance_coef

    def routes(self) -> dict[str, Tensor]:
        """Every task's k experts, largest router logit first (a function of the parameters only)."""
        return {t: top_k(self.routers[t].detach(), self.k) for t in self.task_names}

    def used(self) -> list[int]:
        """The experts some task routes to, ascending: the order of ``features``."""
        return sorted({int(e) for chosen in self.routes().values() for e in chosen})

    def features(self, x: Tensor) -> list[Tensor]:
        """f_e(h) for every routed expert e (``used()``), each (N, d)."""
        used = self.used()
        h = self.encoder(x)
        return list(self.experts(h, torch.tensor(used, device=h.device)).unbind(1))

    def reads(self, task: str) -> list[int]:
        """The positions of ``task``'s k experts in ``features``, in its routing order."""
        where = {e: i for i, e in enumerate(self.used())}
        return [where[int(e)] for e in self.routes()[task]]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """tower_t(sum_{e in K_t} w_{t,e} f_e(h)) for every task asked."""
        routes = self.routes()
        out = {}
        for t in tasks or self.task_names:
            chosen = torch.stack([features[i] for i in self.reads(t)], dim=1)  # (N, k, d)
            w = route_weights(self.routers[t], routes[t], self.renormalize)
            out[t] = self.heads[t](torch.einsum("e,ned->nd", w, chosen))
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``outputs(features(x), tasks)``."""
        return self.outputs(self.features(x), tasks)

    def aux_loss(self) -> Tensor | None:
        """balance_coef times the load-balancing loss over the tasks' routers (parameters only); None at 0."""
        if not self.balance_coef:
            return None
        logits = torch.stack([self.routers[t] for t in self.task_names])
        routes = self.routes()
        chosen = torch.stack([routes[t] for t in self.task_names])
        if self.balance == "switch":
            return self.balance_coef * switch_balance(torch.softmax(logits, dim=-1), chosen)
        weights = torch.zeros_like(logits)
        for j in range(len(self.task_names)):
            weights[j, chosen[j]] = route_weights(logits[j], chosen[j], self.renormalize)
        return self.balance_coef * importance_balance(weights)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's trainable parameters and every expert's."""
        yield from (p for p in self.encoder.parameters() if p.requires_grad)
        yield from self.experts.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """``task``'s router logits and tower."""
        yield self.routers[task]
        yield from self.heads[task].parameters()


class TaskMoEParams(BaseModel):
    """Parameters of ``task_moe``; the defaults are sized for small tabular/vision problems."""

    model_config = ConfigDict(extra="forbid")
    n_experts: int = Field(4, ge=1, le=256, description="number of shared experts E (default 4)")
    top_k: int = Field(2, ge=1, le=256, description="experts each task routes to (default 2, the paper's top-2); "
                       "at most n_experts")
    expert_hidden: list[Width] = Field([64], min_length=1, max_length=8, description="widths of each expert's "
                                       "Linear+ReLU layers; the last is the width the towers read (default [64])")
    renormalize: bool = Field(True, description="weights: softmax over the chosen experts' logits (true, default; "
                              "Shazeer et al. 2017, GShard) or their share of the full softmax (false; Switch)")
    balance: Literal["switch", "importance"] = Field("switch", description="load-balancing loss: switch (Fedus et "
                                                     "al. 2022, default) or importance (Shazeer et al. 2017)")
    balance_coef: float = Field(0.01, ge=0.0, le=1e3, description="coefficient of the load-balancing loss "
                                "(default 0.01, Switch's alpha; 0: none)")


@ARCHITECTURES.register("task_moe", params=TaskMoEParams,
                        summary="task-routed sparse mixture-of-experts: each task's router picks its top-k experts, "
                                "with a load-balancing loss",
                        paper="Kudugunta et al. 2021, Findings of EMNLP")
def _task_moe(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: TaskMoEParams) -> MultiTaskModel:
    if params.top_k > params.n_experts:
        raise ConfigError(f"model.architecture_params.top_k: {params.top_k} experts per task out of "
                          f"{params.n_experts}; use top_k <= n_experts")
    return TaskMoE(encoder, rep_dim, tasks, params.n_experts, params.top_k, params.expert_hidden, params.renormalize,
                   params.balance, params.balance_coef)
