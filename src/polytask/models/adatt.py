"""AdaTT: Li, Zhang, Yuan, Gao, Zhang, Yang, Liu & Yang 2023, "AdaTT: Adaptive Task-to-Task Fusion Network for
Multitask Learning in Recommendations", KDD 2023 (arXiv 2304.04959).

A deep fusion network: at each fusion level every task has its own experts (and optionally there are shared
experts); task t's fusion unit adds a gated mixture of *all* experts of the level (AllExpGF: softmax gate read from
t's input to the level) and a linear combination of t's own experts (NativeExpLF, the residual); the last level's
output goes to t's tower. Reference code read: facebookresearch/AdaTT ``mtl_lib.py`` (``AdaTTSp`` without and
``AdaTTWSharedExps`` with shared experts, MIT licence).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import chain

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.ple import GroupedExperts, Width, gate_mix
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task


class AdaTTParams(BaseModel):
    """Parameters of ``adatt``."""

    model_config = ConfigDict(extra="forbid")
    levels: int = Field(2, ge=1, le=8, description="fusion levels (the authors' len(expert_out_dims)); 2 sized for "
                        "small problems")
    task_experts: int = Field(2, ge=1, le=256, description="experts of each task per level (m_t); 2 as in the "
                              "authors' examples")
    shared_experts: int = Field(0, ge=0, le=256, description="shared experts per level; 0 is AdaTT-sp, more is the "
                                "general AdaTT with a shared fusion unit below the last level")
    expert_hidden: list[Width] = Field([64], min_length=1, max_length=8, description="widths of each expert's "
                                       "Linear+ReLU layers (the last is the expert's output), the same at every "
                                       "level; [64] sized for small tabular/vision problems")
    residual: bool = Field(True, description="add the linear combination of a unit's own experts (NativeExpLF; "
                           "self_exp_res_connect in the authors' code, who call it crucial); false only to ablate")


def native_weights(n: int) -> nn.Parameter:
    """A fusion unit's learnt weights v over its ``n`` own experts, uniform in ±sqrt(1/n) as the authors' code."""
    scale = math.sqrt(1.0 / n)
    return nn.Parameter(torch.empty(n).uniform_(-scale, scale))


def fuse(gate_logits: Tensor, experts: Tensor, own: slice, v: Tensor | None, residual: bool) -> Tensor:
    """One fusion unit: ``softmax(gate_logits) E + v^T E[own]`` (AllExpGF + NativeExpLF). ``experts`` (N, E, d) are
    all experts of the level, ``own`` the unit's own among them; without ``v`` (a unit with one own expert) the
    residual is that expert itself (v = 1), as in the paper and the authors' code."""
    out = gate_mix(gate_logits, experts)
    if not residual:
        return out
    mine = experts[:, own]
    return out + (mine[:, 0] if v is None else (v.unsqueeze(-1) * mine).sum(1))


class _FusionLevel(nn.Module):
    """One fusion level: every expert of the level in one bank (task t's experts in task order, then the shared
    ones), a gate per task over all experts, and (below the last level, with shared experts) the shared unit's
    gate; learnt native weights for units with more than one own expert."""

    def __init__(self, names: Sequence[str], in_dim: int, k: int, s: int, widths: Sequence[int], stacked: bool,
                 last: bool, residual: bool) -> None:
        super().__init__()
        t, e = len(names), len(names) * k + s
        groups = [i for i in range(t) for _ in range(k)] + [t] * s
        self.experts = GroupedExperts(e, in_dim, widths, groups if stacked else None)
        self.gates = nn.ModuleDict({n: nn.Linear(in_dim, e) for n in names})
        self.native = nn.ParameterDict({n: native_weights(k) for n in names} if residual and k > 1 else {})
        shared_unit = s > 0 and not last
        self.shared_gate = nn.Linear(in_dim, e) if shared_unit else None
        self.shared_native = native_weights(s) if shared_unit and residual and s > 1 else None


class AdaTT(MultiTaskModel):
    """Adaptive Task-to-Task fusion (Li et al. 2023, KDD), on the output ``h`` of any encoder.

    Level l (1..L): task t's experts read t's input x_t^{l-1} (x^0 = h), shared experts the shared unit's input;
    E^l stacks every expert's output. Task t's fusion unit:
    ``x_t^l = softmax(W_t^l x_t^{l-1}) E^l + v_t^l E_t^l`` (AllExpGF: a gate over all experts; NativeExpLF: a
    learnt combination of t's own experts, fixed to the single expert when t has one); the shared unit (general
    AdaTT, below the last level only) is the same over the shared experts. Tower t (``make_head``) reads x_t^L.

    Shared and per-task parameters (the engine's sense): every expert, at every level, feeds every task's gate at
    its level, so all experts are shared, as are all units below level L; task t's own parameters are its level-L
    gate and native weights and its tower. ``features``: the tasks' inputs to level L (h once when L = 1) and
    level L's experts stacked (N, E, d).

    Deliberate differences from the paper and the authors' code: towers are polytask heads (``task.head.hidden``
    Linear+ReLU layers and a linear output; the authors' towers are an MLP and a Linear); every level's experts
    have the same widths (``expert_hidden``; the code takes per-level widths); a unit with exactly one own expert
    always uses v = 1 (``AdaTTWSharedExps`` learns v for every unit as soon as any unit has more than one expert);
    the residual is added as ``v^T E_own`` after the gated sum instead of adding v to the gate weights (the same
    sum, rounded differently). The paper's equation numbers were not checked here (its full text was not
    reachable: the names AllExpGF/NativeExpLF are the paper's terms as recalled); the equations follow the
    authors' code, which a test recomputes unit by unit."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], levels: int = 2,
                 task_experts: int = 2, shared_experts: int = 0, expert_hidden: Sequence[int] = (64,),
                 residual: bool = True) -> None:
        super().__init__()
        if levels < 1 or task_experts < 1 or shared_experts < 0 or not expert_hidden:
            raise ConfigError(f"model.architecture_params: AdaTT needs levels and task_experts >= 1, shared_experts "
                              f">= 0 and expert_hidden widths; got levels={levels}, task_experts={task_experts}, "
                              f"shared_experts={shared_experts}, expert_hidden={list(expert_hidden)}")
        self.encoder = encoder
        self.task_names = [t.name for t in tasks]
        self.k, self.s, self.residual = task_experts, shared_experts, residual
        widths, d = list(expert_hidden), rep_dim
        fusion = []
        for j in range(levels):
            fusion.append(_FusionLevel(self.task_names, d, task_experts, shared_experts, widths, stacked=j > 0,
                                       last=j == levels - 1, residual=residual))
            d = widths[-1]
        self.levels = nn.ModuleList(fusion)
        self.heads = nn.ModuleDict({t.name: make_head(t, d) for t in tasks})

    def _unit(self, level: _FusionLevel, i: int, x: Tensor, experts: Tensor) -> Tensor:
        """Task ``i``'s fusion unit (i = number of tasks: the shared unit) at ``level`` from its input ``x``."""
        t, k = len(self.task_names), self.k
        if i == t:
            assert level.shared_gate is not None
            return fuse(level.shared_gate(x), experts, slice(t * k, t * k + self.s), level.shared_native,
                        self.residual)
        n = self.task_names[i]
        return fuse(level.gates[n](x), experts, slice(i * k, (i + 1) * k), level.native.get(n), self.residual)

    def features(self, x: Tensor) -> list[Tensor]:
        """[the tasks' inputs to the last level (h once when there is one level), the last level's experts]."""
        h = self.encoder(x)
        t = len(self.task_names)
        inp = h
        for level in self.levels[:-1]:
            ex = level.experts(inp)
            units = range(t + 1) if level.shared_gate is not None else range(t)
            inp = torch.stack([self._unit(level, i, inp if inp.dim() == 2 else inp[:, i], ex) for i in units], 1)
        ex = self.levels[-1].experts(inp)
        return [inp, ex] if inp.dim() == 2 else [*(inp[:, i] for i in range(t)), ex]

    def reads(self, task: str) -> list[int]:
        """The task's input to the last level and the last level's experts."""
        if len(self.levels) == 1:
            return [0, 1]
        return [self.task_names.index(task), len(self.task_names)]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        out = {}
        for n in tasks or self.task_names:
            i = self.task_names.index(n)
            x, ex = (features[j] for j in self.reads(n))
            out[n] = self.heads[n](self._unit(self.levels[-1], i, x, ex))
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's trainable parameters, every level below the last, and the last level's experts."""
        below: list[nn.Module] = [self.encoder, *self.levels[:-1], self.levels[-1].experts]
        return (p for m in below for p in m.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Task's last-level gate and native weights, and its tower."""
        last = self.levels[-1]
        native = [last.native[task]] if task in last.native else []
        return chain(last.gates[task].parameters(), native, self.heads[task].parameters())


@ARCHITECTURES.register("adatt", params=AdaTTParams, summary="adaptive task-to-task fusion: per-level task (and "
                        "optional shared) experts fused by gates over all experts plus a residual of the task's "
                        "own", paper="Li et al. 2023, KDD")
def _adatt(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: AdaTTParams) -> MultiTaskModel:
    return AdaTT(encoder, rep_dim, tasks, params.levels, params.task_experts, params.shared_experts,
                 params.expert_hidden, params.residual)
