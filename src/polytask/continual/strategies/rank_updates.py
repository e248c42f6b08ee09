"""Incremental rank updates: Hyder, Shao, Hou, Markopoulos, Prater-Bennette & Asif 2022, "Incremental Task Learning
with Incremental Rank Updates" (ECCV; arXiv 2207.09074), after the authors' reference code
(github.com/CSIPlab/task-increment-rank-update, ``mlp_permuted_mnist.ipynb``).

Every Linear layer of the shared encoder is a sum of low-rank factors. Experience e adds one new factor pair per layer
(rank ``first_rank`` for the first experience, ``rank`` for each later one: the paper's rank-1 update) and freezes
the earlier ones; each task k of experience e has its own selector s_k (one entry per factor column learnt so far,
R_e = first_rank + e·rank of them) that re-weights every factor, old ones included, and its own bias. With the
authors' row convention (x a row vector, U the input side, V the output side) a layer computes, for task k::

    h = σ(x U_{≤e} diag(s_k) V_{≤e}ᵀ + b_k),   U_{≤e} = [U_0 … U_e] (in × R_e),  V_{≤e} = [V_0 … V_e] (out × R_e)

(in torch's layout the weight is V diag(s_k) Uᵀ), followed by the task's own head. What experience e trains: U_e,
V_e, and the selectors, biases and heads of its tasks; everything else is frozen (``requires_grad`` False: no
gradient, so no optimiser, momentum or weight decay moves it). A task's output depends only on the factors up to
its experience and on its own selector, biases and head, all frozen once its experience ends, so an earlier task's
outputs stay exactly what they were (zero forgetting, bit for bit). The task id picks the selector at inference,
so the strategy applies to the ``task`` and ``multitask`` scenarios only (a task seen in one experience only).

Initialisation as in the reference code: every factor block orthogonal (``torch.nn.init.orthogonal_``), each new
task's selector one on the new factor and zero on the old ones, biases zero. All blocks are allocated and drawn at
``wrap`` (one slot per experience, from a generator seeded with the run's seed), so the model's shapes never change
and every checkpoint of the run loads; the ``live`` buffer counts the experiences begun.

Memory: experience e (with n_e tasks) adds, per factorised layer of width in → out, ``rank_e·(in + out)`` factor
entries and ``n_e·(R_e + out)`` selector and bias entries (``experience_numel``), plus each task's head as any
task-incremental model has; the strategy keeps no state of its own beyond the model.

Differences, documented: the reference code trains with Adam (lr 1e-5 for the first task, 1e-4 after) on the mean
squared error between the softmax and the one-hot label; here the run's optimiser (fresh per experience) and the
task's own loss train every experience. Its first-task rank is 11 (784 → 256 layers); the default here is 10. Only
``nn.Linear`` layers that are direct children of an ``nn.Sequential`` encoder under hard sharing are factorised
(the ``mlp`` backbone); the paper also applies the method to convolutional networks, which is not implemented
here: an encoder with any other module holding parameters is refused. The base model's own encoder weights are discarded
(the factors are drawn afresh); its heads are kept (torch's default Linear init, not orthogonal). An experience
with several tasks (a polytask stream may have one; the paper has one task per increment) gives them one new
factor pair together and a selector, biases and head each. ``features`` encodes the input once per task (each
task reads its own representation), so representation-mode and aggregator steps cost one encoder pass per task of
the stream. Composing with a strategy that protects old weights or outputs adds nothing for the frozen part (the
regularisers and ``lwf`` leave frozen weights and outputs out) and protects what still trains (tested with ``ewc``,
``si``, ``mas``, ``lwf``); rehearsal composes (``replay`` was run). The paper's equation
numbers could not be checked here (its text was not available); the formula above is read off the reference code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream
from polytask.errors import ConfigError
from polytask.models.sharing import HardSharing, MultiTaskModel


def slot_ranks(n_experiences: int, first_rank: int, rank: int) -> list[int]:
    """The rank of each experience's factor pair: ``first_rank`` for the first, ``rank`` for every later one."""
    return [first_rank] + [rank] * (n_experiences - 1)


def experience_numel(layers: Sequence[tuple[int, int]], ranks: Sequence[int], index: int, n_tasks: int,
                     bias: bool = True) -> int:
    """Parameters experience ``index`` adds to the encoder (heads not counted): per layer of width ``(in, out)``
    its factor pair ``ranks[index]·(in + out)``, and per task a selector over every factor column so far
    (``sum(ranks[:index + 1])``) and a bias of ``out`` entries."""
    columns = sum(ranks[:index + 1])
    return sum(ranks[index] * (i + o) + n_tasks * (columns + (o if bias else 0)) for i, o in layers)


def task_experiences(stream: Stream) -> dict[str, int]:
    """The experience each task of ``stream`` trains in; a ConfigError names a task that two experiences train (its
    selector would be retrained with more factors than its first experience had, changing its earlier outputs)."""
    seen: dict[str, int] = {}
    for i, e in enumerate(stream.experiences):
        for t in e.tasks:
            if t.name in seen:
                raise ConfigError(f"strategy rank_updates: task {t.name!r} is trained by experiences "
                                  f"{stream.experiences[seen[t.name]].name!r} and {e.name!r} of stream "
                                  f"{stream.name!r}; each task must arrive in one experience (its selector is "
                                  "learnt once, then frozen)")
            seen[t.name] = i
    return seen


class RankLinear(nn.Module):
    """A Linear layer as low-rank factors, one pair per experience, and a selector and bias per task: task k of
    experience e computes ``x U_{≤e} diag(s_k) V_{≤e}ᵀ + b_k`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int], task_slot: Sequence[int],
                 bias: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.task_slot = list(task_slot)
        self.U = nn.ParameterList([nn.Parameter(_orthogonal(in_features, r, generator)) for r in ranks])
        self.V = nn.ParameterList([nn.Parameter(_orthogonal(out_features, r, generator)) for r in ranks])
        self.s = nn.ParameterList([nn.Parameter(initial_selector(ranks, e)) for e in self.task_slot])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(out_features)) for _ in self.task_slot] if bias else [])

    def forward(self, x: Tensor, task: int) -> Tensor:
        """The layer for task number ``task`` (its selector, bias and the factors up to its experience)."""
        e = self.task_slot[task]
        u = torch.cat(list(self.U[:e + 1]), 1)
        v = torch.cat(list(self.V[:e + 1]), 1)
        out = (x @ u * self.s[task]) @ v.T
        return out + self.b[task] if len(self.b) else out

    def weight(self, task: int) -> Tensor:
        """Task ``task``'s dense weight in torch's (out, in) layout: ``V diag(s) Uᵀ`` (for inspection)."""
        e = self.task_slot[task]
        return torch.cat(list(self.V[:e + 1]), 1) * self.s[task] @ torch.cat(list(self.U[:e + 1]), 1).T


def _orthogonal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w, generator=generator)
    return w


def initial_selector(ranks: Sequence[int], index: int) -> Tensor:
    """A new task's selector in experience ``index`` (the reference code): zero on the earlier factors' columns,
    one on the new factor's."""
    return torch.cat([torch.zeros(sum(ranks[:index])), torch.ones(ranks[index])])


class RankUpdateModel(MultiTaskModel):
    """A hard-sharing model whose encoder's Linear layers are :class:`RankLinear`: each task encodes ``x`` with its
    own selectors and biases, so each task reads its own feature (``features`` gives one per task)."""

    def __init__(self, base: HardSharing, stream: Stream, first_rank: int, rank: int, seed: int) -> None:
        super().__init__()
        self.task_names = list(base.task_names)
        experience_of = task_experiences(stream)
        missing = [t for t in self.task_names if t not in experience_of]
        if missing:
            raise ConfigError(f"strategy rank_updates: the model's task(s) {missing} arrive in no experience of stream "
                              f"{stream.name!r}")
        self.ranks = slot_ranks(len(stream.experiences), first_rank, rank)
        self.task_slot = [experience_of[t] for t in self.task_names]
        self.index = {t: k for k, t in enumerate(self.task_names)}
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(_factorised(base.encoder, self.ranks, self.task_slot, generator))
        self.heads = base.heads
        self.register_buffer("live", torch.zeros((), dtype=torch.long))

    def rank_layers(self) -> list[RankLinear]:
        """The factorised layers, input first."""
        return [m for m in self.layers if isinstance(m, RankLinear)]

    def encode(self, x: Tensor, task: str) -> Tensor:
        """``task``'s representation of ``x``: the encoder with its selectors and biases."""
        k = self.index[task]
        for m in self.layers:
            x = m(x, k) if isinstance(m, RankLinear) else m(x)
        return x

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {t: self.heads[t](self.encode(x, t)) for t in (tasks or self.task_names)}

    def features(self, x: Tensor) -> list[Tensor]:
        """One representation per task (in ``task_names`` order). A task whose encoder has nothing that trains (an
        earlier experience's, frozen) gets its representation as a leaf that requires grad when gradients are on,
        so the engine's backward through every feature works (nothing flows below it)."""
        out = [self.encode(x, t) for t in self.task_names]
        if torch.is_grad_enabled():
            out = [z if z.requires_grad else z.detach().requires_grad_() for z in out]
        return out

    def reads(self, task: str) -> Sequence[int]:
        return [self.index[task]]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {t: self.heads[t](features[self.index[t]]) for t in (tasks or self.task_names)}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters that train now: the current experience's factors, and its tasks' selectors and
        biases (a task's own selector gets no other task's gradient: each task reads its own feature)."""
        return (p for p in self.layers.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return (p for p in self.heads[task].parameters() if p.requires_grad)

    def train_experience(self, index: int) -> None:
        """Make experience ``index``'s parameters (its factor pair, its tasks' selectors, biases and heads) the only
        ones that train, and count ``index + 1`` experiences live."""
        if not 0 <= index < len(self.ranks):
            raise ConfigError(f"strategy rank_updates: experience {index} is outside the stream's "
                              f"{len(self.ranks)} experiences")
        for layer in self.rank_layers():
            for e, (u, v) in enumerate(zip(layer.U, layer.V, strict=True)):
                u.requires_grad_(e == index)
                v.requires_grad_(e == index)
            for k, e in enumerate(self.task_slot):
                layer.s[k].requires_grad_(e == index)
                if len(layer.b):
                    layer.b[k].requires_grad_(e == index)
        for t, k in self.index.items():
            self.heads[t].requires_grad_(self.task_slot[k] == index)
        self.live.fill_(index + 1)

    def experience_parameters(self, index: int) -> list[nn.Parameter]:
        """The encoder parameters experience ``index`` adds (its factor pair, its tasks' selectors and biases)."""
        out: list[nn.Parameter] = []
        for layer in self.rank_layers():
            out += [layer.U[index], layer.V[index]]
            for k, e in enumerate(self.task_slot):
                if e == index:
                    out += [layer.s[k]] + ([layer.b[k]] if len(layer.b) else [])
        return out

    def live_numel(self) -> int:
        """Parameter entries in use by the experiences begun so far (their encoder parameters and heads)."""
        live = int(self.live)
        heads = sum(p.numel() for t, k in self.index.items() if self.task_slot[k] < live
                    for p in self.heads[t].parameters())
        return heads + sum(p.numel() for i in range(live) for p in self.experience_parameters(i))


def _factorised(encoder: nn.Module, ranks: Sequence[int], task_slot: Sequence[int],
                generator: torch.Generator) -> list[nn.Module]:
    """The encoder's layers with every Linear replaced by a :class:`RankLinear`; a ConfigError names any other module
    that holds parameters (only Linear layers are factorised)."""
    if not isinstance(encoder, nn.Sequential):
        raise ConfigError(f"strategy rank_updates: the encoder is a {type(encoder).__name__}; rank updates factorise "
                          "the Linear layers of an nn.Sequential encoder (model.backbone: mlp)")
    out: list[nn.Module] = []
    for name, m in encoder.named_children():
        if isinstance(m, nn.Linear):
            out.append(RankLinear(m.in_features, m.out_features, ranks, task_slot, m.bias is not None, generator))
        elif any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            raise ConfigError(f"strategy rank_updates: encoder layer {name!r} is a {type(m).__name__} with weights; "
                              "only nn.Linear layers are factorised (convolutions are not implemented; use "
                              "model.backbone: mlp)")
        else:
            out.append(m)
    if not any(isinstance(m, RankLinear) for m in out):
        raise ConfigError("strategy rank_updates: the encoder has no nn.Linear layer to factorise (model.backbone "
                          "mlp with at least one hidden layer)")
    return out


class RankUpdatesParams(BaseModel):
    """Parameters of ``rank_updates``."""

    model_config = ConfigDict(extra="forbid")
    first_rank: int = Field(10, ge=1, description="rank of the factors the first experience learns in every layer "
                            "(the reference code: 11)")
    rank: int = Field(1, ge=1, description="rank each later experience adds to every layer (the paper's rank-1 "
                      "update)")


class RankUpdates(Strategy):
    """Incremental rank updates (module docstring): new low-rank factors per experience, earlier ones frozen, a
    selector per task chosen by the task id."""

    name = "rank_updates"
    scenarios = ("task", "multitask")

    def __init__(self, params: RankUpdatesParams) -> None:
        super().__init__()
        self.params = params
        self.model: RankUpdateModel | None = None

    def check(self, stream: Stream, label: str) -> None:
        """Refuse class- and domain-incremental streams (no task id to pick a selector) and a task that arrives in
        two experiences."""
        try:
            super().check(stream, label)
        except ConfigError as e:
            raise ConfigError(f"{e}; rank updates pick each task's selector by its task id at test time") from None
        task_experiences(stream)

    def wrap(self, model: torch.nn.Module, stream: Stream) -> torch.nn.Module:
        """The model with its encoder's Linear layers factorised, one factor slot per experience of ``stream``."""
        self.check(stream, self.name)
        if not isinstance(model, HardSharing):
            raise ConfigError(f"strategy rank_updates: the model is a {type(model).__name__}; rank updates factorise "
                              "the shared encoder of hard sharing (model.architecture: hard, model.backbone: mlp)")
        self.model = RankUpdateModel(model, stream, self.params.first_rank, self.params.rank, self.seed)
        return self.model

    def begin(self, stream: Stream, index: int) -> None:
        super().begin(stream, index)
        if self.model is not None:
            self.model.train_experience(index)

    def init(self, run: Any) -> None:
        """Check the job trains the wrapped model and freeze all but the current experience's parameters."""
        if not isinstance(run.model, RankUpdateModel):
            raise ConfigError(f"strategy rank_updates: the job trains a {type(run.model).__name__}, not the model "
                              "the strategy's wrap built (build the model, then train strategy.wrap(model, stream))")
        self.model = run.model
        run.model.train_experience(self.index)


@STRATEGIES.register("rank_updates", params=RankUpdatesParams,
                     summary="incremental rank updates: new low-rank factors per task in every Linear layer, old ones "
                     "frozen, a per-task selector picked by the task id (task-incremental)",
                     paper="Hyder et al. 2022, Incremental Task Learning with Incremental Rank Updates (ECCV)")
def _rank_updates(params: RankUpdatesParams) -> Strategy:
    return RankUpdates(params)
