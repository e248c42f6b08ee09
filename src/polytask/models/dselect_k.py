"""DSelect-k: a continuously differentiable and sparse gate for mixtures of experts (Hazimeh, Zhao, Chowdhery,
Sathiamoorthy, Chen, Mazumder, Hong & Chi 2021, NeurIPS, "DSelect-k: Differentiable Selection in the Mixture of
Experts with Applications to Multi-Task Learning"), one gate per task over shared experts, as in the paper's
multi-task models (MMoE with its softmax gates replaced by DSelect-k gates).

With n experts and m = ceil(log2 n) binary variables, a single-expert selector with code logits z in R^m puts on
expert j (0-based) the weight

    r(z)_j = prod_l  S(z_l) if bit l of j is 1, else 1 - S(z_l)          (bits most-significant first),

with the smooth-step S(t) = 0 for t <= -gamma/2, 1 for t >= gamma/2 and -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2
between. The gate combines k selectors with softmax weights: q = sum_{i=1..k} softmax(alpha)_i r(z^(i)), so at
most k experts get a non-zero weight once the z saturate, and task t's output is its tower on sum_j q_j f_j.
Per-example gates (the default) compute z^(i) = Z^(i) h + b and alpha = A h + c from the shared representation h;
static gates (``gate: static``) learn z and alpha directly (input-independent, one set per task).

Equations checked against the authors' reference code (google-research ``dselect_k_moe/models/dselect_k.py``:
``SmoothStep``, ``DSelectKGate._compute_expert_weights`` and ``_compute_example_conditioned_expert_weights``); the
paper's equation numbers were not checked here. As there: z is initialised uniform in +-gamma/100 (weights and
biases of Z for per-example gates) and alpha uniform in +-0.05 (Keras' ``RandomUniform`` default); when n is not a
power of two, the codes of the last 2^m - n values select no expert and the reference adds sum_i 1 / sum_j
r(z^(i))_j to the loss so that no selector ends on such a code.

Deliberate differences:
- the experts and gates act on the output h of the configured backbone (the shared bottom), not on the raw input;
  the experts are ReLU MLPs of widths ``expert_hidden``; the towers are the tasks' heads;
- the entropy regulariser (lambda * sum_i H(r(z^(i))), the paper's way to speed up convergence to a binary
  selection; the reference computes -sum r log(r + 1e-6)) is offered for static gates only (``entropy_reg``) and
  with a constant lambda (the reference takes a schedule): for per-example gates it is a function of the inputs,
  and ``aux_loss()`` must be computed from the parameters alone, so it is left out there;
- for the same reason the reference's term for unused codes is kept for static gates only, and per-example gates
  need a power-of-two number of experts (a ConfigError otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.experts import GatedExperts, StackedExperts, mix
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task

Width = Annotated[int, Field(ge=1, le=65536)]
#: added inside the logarithm of the entropy regulariser (the reference's EPSILON)
ENTROPY_EPS = 1e-6


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The smooth-step S(t) of Hazimeh et al. 2021: 0 for t <= -gamma/2, 1 for t >= gamma/2, and the cubic
    -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 between (continuously differentiable, zero slope at both ends)."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def binary_codes(n_experts: int) -> Tensor:
    """(n, m) bool, m = ceil(log2 n): row j holds the binary code of j, most significant bit first."""
    m = max(1, math.ceil(math.log2(n_experts)))
    bits = torch.arange(m - 1, -1, -1)
    return (torch.arange(n_experts)[:, None] >> bits) & 1 == 1


def selectors(z: Tensor, codes: Tensor, gamma: float) -> Tensor:
    """Single-expert selectors r(z): ``z`` (..., k, m) code logits -> (..., k, n) expert weights, r(z)_j the
    product over bits l of S(z_l) where bit l of j is 1 and 1 - S(z_l) where it is 0."""
    s = smooth_step(z, gamma).unsqueeze(-2)  # (..., k, 1, m)
    return torch.where(codes, s, 1 - s).prod(-1)


def dselect_weights(alpha: Tensor, r: Tensor) -> Tensor:
    """The DSelect-k gate q = sum_i softmax(alpha)_i r_i: ``alpha`` (..., k), ``r`` (..., k, n) -> (..., n)."""
    return torch.einsum("...k,...kn->...n", torch.softmax(alpha, dim=-1), r)


def selector_entropy(r: Tensor) -> Tensor:
    """sum over selectors of -sum_j r_j log(r_j + 1e-6) (the reference's entropy regulariser, before lambda)."""
    return -(r * torch.log(r + ENTROPY_EPS)).sum()


def unused_code_penalty(r: Tensor) -> Tensor:
    """sum over selectors of 1 / sum_j r_j: large when a selector's weight sits on a code of no expert (n not a
    power of two; the reference's term, 1 for a selector whose weight is all on experts)."""
    return (1.0 / r.sum(-1)).sum()


class DSelectGate(nn.Module):
    """One task's DSelect-k gate over ``n_experts`` experts with ``k`` selectors; ``per_example``: z and alpha are
    affine in the representation h (``forward(h)`` -> (N, n)), else learned directly (``forward()`` -> (n,))."""

    def __init__(self, rep_dim: int, n_experts: int, k: int, gamma: float, per_example: bool) -> None:
        super().__init__()
        self.k, self.gamma, self.per_example = k, gamma, per_example
        self.register_buffer("codes", binary_codes(n_experts), persistent=False)
        m = self.codes.shape[1]
        z_bound, a_bound = gamma / 100, 0.05
        if per_example:
            self.z = nn.Linear(rep_dim, k * m)
            self.alpha = nn.Linear(rep_dim, k)
            for layer, bound in ((self.z, z_bound), (self.alpha, a_bound)):
                nn.init.uniform_(layer.weight, -bound, bound)
                nn.init.uniform_(layer.bias, -bound, bound)
        else:
            self.z_logits = nn.Parameter(torch.empty(k, m).uniform_(-z_bound, z_bound))
            self.alpha_logits = nn.Parameter(torch.empty(k).uniform_(-a_bound, a_bound))

    def selector_weights(self, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(alpha, r): the selector logits (..., k) and the single-expert selectors (..., k, n)."""
        if self.per_example:
            if h is None:
                raise ValueError("a per-example DSelect-k gate needs the representation h")
            z = self.z(h).unflatten(-1, (self.k, self.codes.shape[1]))
            return self.alpha(h), selectors(z, self.codes, self.gamma)
        return self.alpha_logits, selectors(self.z_logits, self.codes, self.gamma)

    def forward(self, h: Tensor | None = None) -> Tensor:
        """The expert weights q: (N, n) per example, or (n,) for a static gate."""
        return dselect_weights(*self.selector_weights(h))


class DSelectK(GatedExperts):
    """Shared experts on the encoder's output h, one DSelect-k gate and one tower per task (Hazimeh et al. 2021).

    Shared features: per-example gates [h, F] (the gates read h), static gates [F]; F = (f_1(h) .. f_n(h)) as
    (N, n, d). Shared parameters: the encoder's and the experts'; task t's own: its gate and its tower."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], n_experts: int, k: int,
                 expert_hidden: Sequence[int], gamma: float, per_example: bool, entropy_reg: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.experts = StackedExperts(n_experts, rep_dim, expert_hidden)
        self.gates = nn.ModuleDict({t.name: DSelectGate(rep_dim, n_experts, k, gamma, per_example) for t in tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, self.experts.out_dim) for t in tasks})
        self.task_names = [t.name for t in tasks]
        self.per_example = per_example
        self.entropy_reg = entropy_reg
        self.power_of_two = n_experts == 2 ** math.ceil(math.log2(n_experts))

    def features(self, x: Tensor) -> list[Tensor]:
        """[h, F] (per-example gates) or [F] (static gates)."""
        h = self.encoder(x)
        experts = self.experts(h)
        return [h, experts] if self.per_example else [experts]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Task t's tower on sum_j q^t_j f_j, q^t its gate's expert weights."""
        if self.per_example:
            h, experts = features
            return {t: self.heads[t](mix(self.gates[t](h), experts)) for t in (tasks or self.task_names)}
        (experts,) = features
        return {t: self.heads[t](mix(self.gates[t](), experts)) for t in (tasks or self.task_names)}

    def aux_loss(self) -> Tensor | None:
        """Static gates only (parameter-only terms): entropy_reg * the selectors' entropy, plus, when the number of
        experts is not a power of two, the reference's penalty on selectors that weigh codes of no expert; None
        when neither applies (always for per-example gates)."""
        if self.per_example or (self.power_of_two and not self.entropy_reg):
            return None
        rs = [self.gates[t].selector_weights()[1] for t in self.task_names]
        terms = []
        if self.entropy_reg:
            terms.append(self.entropy_reg * torch.stack([selector_entropy(r) for r in rs]).sum())
        if not self.power_of_two:
            terms.append(torch.stack([unused_code_penalty(r) for r in rs]).sum())
        return torch.stack(terms).sum()



class DSelectKParams(BaseModel):
    """Parameters of ``dselect_k``; the defaults are sized for small tabular/vision problems."""

    model_config = ConfigDict(extra="forbid")
    n_experts: int = Field(4, ge=2, le=256, description="number of shared experts n (default 4); per-example gates "
                           "need a power of two")
    k: int = Field(2, ge=1, le=256, description="number of single-expert selectors per gate: at most k experts get "
                   "a non-zero weight (default 2); at most n_experts")
    expert_hidden: list[Width] = Field([64], min_length=1, max_length=8, description="widths of each expert's "
                                       "Linear+ReLU layers; the last is the width the towers read (default [64])")
    gamma: float = Field(1.0, gt=0.0, le=1e3, description="width of the smooth-step's cubic region (default 1.0, "
                         "the reference code's)")
    gate: Literal["per_example", "static"] = Field("per_example", description="per_example: the selectors are "
                                                   "affine in the representation; static: learned per task, the same "
                                                   "for every input")
    entropy_reg: float = Field(0.0, ge=0.0, le=1e3, description="lambda of the selectors' entropy regulariser "
                               "(static gates only; default 0: off)")


@ARCHITECTURES.register("dselect_k", params=DSelectKParams,
                        summary="shared experts mixed by a differentiable sparse (k-of-n) DSelect-k gate per task",
                        paper="Hazimeh et al. 2021, NeurIPS")
def _dselect_k(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: DSelectKParams) -> MultiTaskModel:
    where = "model.architecture_params"
    if params.k > params.n_experts:
        raise ConfigError(f"{where}.k: {params.k} selectors for {params.n_experts} experts; use k <= n_experts")
    per_example = params.gate == "per_example"
    if per_example and params.n_experts & (params.n_experts - 1):
        raise ConfigError(f"{where}.n_experts: per-example DSelect-k gates need a power of two (got "
                          f"{params.n_experts}): the reference's penalty for unused codes depends on the input, and an "
                          "architecture's aux_loss is computed from parameters only; use 2, 4, 8, ... or gate: static")
    if per_example and params.entropy_reg:
        raise ConfigError(f"{where}.entropy_reg: the entropy regulariser of per-example gates depends on the input, "
                          "and an architecture's aux_loss is computed from parameters only; use gate: static or "
                          "entropy_reg: 0")
    return DSelectK(encoder, rep_dim, tasks, params.n_experts, params.k, params.expert_hidden, params.gamma,
                    per_example, params.entropy_reg)
