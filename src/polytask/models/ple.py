"""CGC and PLE: Tang, Liu, Zhao & Gong 2020, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020.

CGC (Customized Gate Control, Sec. 4.1) is one extraction layer with shared experts and each task's own experts;
task k's gate mixes the shared experts and k's own (Eq. 2-5). PLE (Sec. 4.2) stacks extraction layers; every layer
but the last also has a shared gate that mixes *all* experts of the layer and feeds the next layer's shared experts,
and task k's gate at layer j reads k's output of layer j-1 (Eq. 6-7). PLE with one level is CGC. Equation and
section numbers are those of the RecSys paper (Eq. 1 is the ranking score of Sec. 3), read from a transcription of
its text.

Also here: :class:`GroupedExperts` (stacked-weight experts whose experts may read different inputs) and
:func:`gate_mix` (a softmax gate's weighted sum of experts), which AdaTT (``polytask.models.adatt``) reuses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.experts import StackedExperts, mix
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task

Width = Annotated[int, Field(ge=1, le=65536)]


class GroupedExperts(StackedExperts):
    """:class:`~polytask.models.experts.StackedExperts` (Linear + ReLU experts with stacked weights, one einsum per
    layer, no loop over experts) whose experts may read different inputs: with a stacked (N, G, in) input, expert e
    reads row ``groups[e]`` (task k's experts read k's representation, the shared experts the shared one)."""

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int], groups: Sequence[int] | None = None) -> None:
        super().__init__(n, in_dim, hidden)
        if groups is not None and len(groups) != n:
            raise ValueError(f"GroupedExperts: {len(groups)} groups for {n} experts")
        self.groups: Tensor | None
        self.register_buffer("groups", None if groups is None else torch.tensor(list(groups)), persistent=False)

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """``x``: (N, in) read by every expert, or (N, G, in) with expert e reading ``x[:, groups[e]]``; returns the
        experts' outputs (N, n, out). ``index`` (plain inputs only): those experts only, as StackedExperts."""
        if x.dim() == 2:
            return super().forward(x, index)
        if self.groups is None or index is not None:
            raise ValueError("GroupedExperts: a stacked (N, G, in) input needs groups and takes no index")
        z = x[:, self.groups]
        for w, b in zip(self.weights, self.biases, strict=True):
            z = torch.relu(torch.einsum("nei,eio->neo", z, w) + b)
        return z


def gate_mix(logits: Tensor, experts: Tensor) -> Tensor:
    """A softmax gate's mixture of experts: ``sum_e softmax(logits)_e * experts[:, e]`` (PLE Eq. 2-3; MMoE's gate).
    ``logits`` (N, E), ``experts`` (N, E, d) -> (N, d)."""
    return mix(torch.softmax(logits, dim=-1), experts)


class CGCParams(BaseModel):
    """Parameters of ``cgc`` (one extraction layer)."""

    model_config = ConfigDict(extra="forbid")
    shared_experts: int = Field(2, ge=1, le=256, description="shared experts per level (m_s in Eq. 3); the "
                                "default 2, with 2 experts per task, is the AdaTT authors' PLE example")
    task_experts: int = Field(2, ge=1, le=256, description="experts of each task per level (m_k in Eq. 3)")
    expert_hidden: list[Width] = Field([64], min_length=1, max_length=8, description="widths of each expert's "
                                       "Linear+ReLU layers (the last is the expert's output), the same at every "
                                       "level; [64]: one layer, as the paper's experts (Sec. 5.1.3), sized for "
                                       "small tabular/vision problems")


class PLEParams(CGCParams):
    """Parameters of ``ple``: CGC's, and how many extraction levels are stacked."""

    levels: int = Field(2, ge=1, le=8, description="extraction levels (N in Eq. 7); 1 is CGC; 2 as in the paper's "
                        "experiments (Sec. 5.1.3)")


class _Extraction(nn.Module):
    """One lower (not last) PLE extraction level: every expert in one bank (task experts first, in task order, then
    the shared ones), a gate per task over (its experts, shared experts) and the shared gate over all experts."""

    def __init__(self, names: Sequence[str], in_dim: int, k: int, s: int, widths: Sequence[int],
                 stacked: bool) -> None:
        super().__init__()
        t = len(names)
        groups = [i for i in range(t) for _ in range(k)] + [t] * s
        self.experts = GroupedExperts(t * k + s, in_dim, widths, groups if stacked else None)
        self.gates = nn.ModuleDict({n: nn.Linear(in_dim, k + s) for n in names})
        self.shared_gate = nn.Linear(in_dim, t * k + s)


class PLE(MultiTaskModel):
    """Progressive Layered Extraction (Tang et al. 2020, RecSys), on the output ``h`` of any encoder.

    Level j (1..N) has ``shared_experts`` shared experts reading the shared branch's input g^{s,j-1} and, for each
    task k, ``task_experts`` experts reading k's input g^{k,j-1} (g^{.,0} = h). Task k's gate (Eq. 2-3, 6)
    ``g^{k,j} = softmax(W^{k,j} g^{k,j-1}) S^{k,j}`` mixes S^{k,j} = [k's experts, shared experts] (Eq. 4, the
    paper's order); below the last level the shared gate mixes every expert of the level (Sec. 4.2; in the order
    [task 1's, ..., task T's, shared], which the paper leaves open, as the AdaTT authors' PLE) and gives g^{s,j}.
    The tower (``make_head``) reads g^{k,N} (Eq. 7; with N = 1: Eq. 5). Experts are Linear+ReLU layers.

    Shared and per-task parameters (the engine's sense: task k's are exactly those only k's loss reaches): with
    one level (CGC) k's experts, k's gate and k's tower are k's own. With N >= 2, every expert below level N also
    feeds the shared gate, so it is shared, and so are the gates below level N-1; task k's own parameters are its
    gate at level N-1 (its output reaches only k's level-N experts and gate), its level-N experts and gate, and
    its tower. ``features`` are what those read, all computed by shared parameters: for CGC [h, shared experts
    (N, m_s, d)]; for N >= 2 [the tasks' inputs to level N-1 (h once when N = 2), level N-1's shared experts,
    each task's level N-1 experts, level N's shared experts].

    Deliberate differences from the paper: the gates are ``nn.Linear`` with a bias (Eq. 3 has W_g^k x, no bias;
    the AdaTT authors' PLE has one too); the towers are polytask heads (``task.head.hidden`` Linear+ReLU layers and
    a linear output; the paper's towers are [256, 128, 64] ReLU MLPs); every level's experts have the same widths
    (``expert_hidden``); the paper's joint-loss changes (Sec. 4.3, Eq. 8-10: per-task sample spaces and decaying
    loss weights) are not part of the architecture: missing labels are masked by the engine and loss weights are
    polytask's weighting methods. The paper released no code; the layer layout was checked against the AdaTT
    authors' PLE (facebookresearch/AdaTT ``mtl_lib.py``, read for reference)."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], levels: int = 2,
                 shared_experts: int = 2, task_experts: int = 2, expert_hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        if levels < 1 or shared_experts < 1 or task_experts < 1 or not expert_hidden:
            raise ConfigError(f"model.architecture_params: PLE needs levels, shared_experts and task_experts >= 1 "
                              f"and expert_hidden widths; got levels={levels}, shared_experts={shared_experts}, "
                              f"task_experts={task_experts}, expert_hidden={list(expert_hidden)}")
        self.encoder = encoder
        self.task_names = [t.name for t in tasks]
        self.levels, self.k, self.s = levels, task_experts, shared_experts
        widths, d = list(expert_hidden), rep_dim
        lower = []
        for j in range(levels - 1):
            lower.append(_Extraction(self.task_names, d, task_experts, shared_experts, widths, stacked=j > 0))
            d = widths[-1]
        self.lower = nn.ModuleList(lower)
        self.shared_experts = StackedExperts(shared_experts, d, widths)
        self.task_experts = nn.ModuleDict({n: StackedExperts(task_experts, d, widths) for n in self.task_names})
        self.gates = nn.ModuleDict({n: nn.Linear(d, task_experts + shared_experts) for n in self.task_names})
        self.heads = nn.ModuleDict({t.name: make_head(t, widths[-1]) for t in tasks})

    def _n_inputs(self) -> int:
        """How many task-input features lead the feature list (one h shared by all tasks when N <= 2)."""
        return 1 if self.levels <= 2 else len(self.task_names)

    def features(self, x: Tensor) -> list[Tensor]:
        """Everything the per-task top reads, computed by shared parameters (see the class docstring)."""
        h = self.encoder(x)
        if self.levels == 1:
            return [h, self.shared_experts(h)]
        t, k = len(self.task_names), self.k
        inp = h
        for level in self.lower[:-1]:
            ex = level.experts(inp)
            shared = ex[:, t * k:]
            rows = [gate_mix(level.gates[n](_row(inp, i)), torch.cat([ex[:, i * k:(i + 1) * k], shared], 1))
                    for i, n in enumerate(self.task_names)]
            rows.append(gate_mix(level.shared_gate(_row(inp, t)), ex))
            inp = torch.stack(rows, 1)  # (N, T + 1, d): each task's input, then the shared branch's
        last = self.lower[-1]
        ex = last.experts(inp)
        top_shared = self.shared_experts(gate_mix(last.shared_gate(_row(inp, t)), ex))
        inputs = [inp] if inp.dim() == 2 else [inp[:, i] for i in range(t)]
        return [*inputs, ex[:, t * k:], *(ex[:, i * k:(i + 1) * k] for i in range(t)), top_shared]

    def reads(self, task: str) -> list[int]:
        """CGC: [h, shared experts]; N >= 2: [task's input, level N-1 shared experts, its own level N-1 experts,
        level N shared experts]."""
        if self.levels == 1:
            return [0, 1]
        i, g = self.task_names.index(task), self._n_inputs()
        return [i if g > 1 else 0, g, g + 1 + i, g + 1 + len(self.task_names)]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        out = {}
        for n in tasks or self.task_names:
            if self.levels == 1:
                x = features[0]
            else:
                r = self.reads(n)
                own_below = torch.cat([features[r[2]], features[r[1]]], 1)
                x = gate_mix(self.lower[-1].gates[n](features[r[0]]), own_below)  # g^{k,N-1}
            own = self.task_experts[n](x)
            g = gate_mix(self.gates[n](x), torch.cat([own, features[-1]], 1))  # g^{k,N}
            out[n] = self.heads[n](g)
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's trainable parameters, every lower level except the task gates of level N-1, and the last
        level's shared experts."""
        below: list[nn.Module] = [self.encoder, self.shared_experts]
        if self.levels > 1:
            below += [*self.lower[:-1], self.lower[-1].experts, self.lower[-1].shared_gate]
        return (p for m in below for p in m.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Task's gate at level N-1 (N >= 2), its level-N experts and gate, and its tower."""
        own: list[nn.Module] = [self.task_experts[task], self.gates[task], self.heads[task]]
        if self.levels > 1:
            own.insert(0, self.lower[-1].gates[task])
        return chain.from_iterable(m.parameters() for m in own)


class CGC(PLE):
    """Customized Gate Control (Tang et al. 2020, RecSys, Sec. 4.1, Eq. 2-5): one extraction level; task k's
    output is ``tower_k(softmax(W_k h) [E_k(h), E_s(h)])`` with k's own experts E_k and the shared experts E_s.
    Task k's experts, gate and tower are k's own parameters. :class:`PLE` with ``levels=1``; its docstring lists
    the deliberate differences from the paper."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], shared_experts: int = 2,
                 task_experts: int = 2, expert_hidden: Sequence[int] = (64,)) -> None:
        super().__init__(encoder, rep_dim, tasks, 1, shared_experts, task_experts, expert_hidden)


def _row(x: Tensor, i: int) -> Tensor:
    """Row ``i`` of a stacked (N, G, d) input; a plain (N, d) input is every row (the first level reads h)."""
    return x if x.dim() == 2 else x[:, i]


@ARCHITECTURES.register("cgc", params=CGCParams, summary="customized gate control: shared + per-task experts, a "
                        "gate per task over the shared and its own experts", paper="Tang et al. 2020, RecSys")
def _cgc(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: CGCParams) -> MultiTaskModel:
    return CGC(encoder, rep_dim, tasks, params.shared_experts, params.task_experts, params.expert_hidden)


@ARCHITECTURES.register("ple", params=PLEParams, summary="progressive layered extraction: stacked CGC levels with a "
                        "shared gate over all experts below the last", paper="Tang et al. 2020, RecSys")
def _ple(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: PLEParams) -> MultiTaskModel:
    return PLE(encoder, rep_dim, tasks, params.levels, params.shared_experts, params.task_experts,
               params.expert_hidden)
