"""Hard Attention to the Task (HAT): Serrà, Surís, Miron & Karatzoglou 2018, "Overcoming catastrophic forgetting
with hard attention to the task", ICML (Eq. 1-5; the authors' code github.com/joansj/hat).

Every hidden unit i of every hidden layer l of the MLP encoder is multiplied by a gate ``a^t_{l,i} = σ(s e^t_{l,i})``
of a task embedding ``e^t`` learnt with task t (one row per experience, preallocated). While task t trains:

- ``s`` is annealed within each epoch from 1/smax to smax (Eq. 3: ``s = 1/smax + (smax - 1/smax)(b-1)/(B-1)``,
  batch b of B); evaluation uses s = smax, where the gates are (almost) binary.
- the gradient of weight ``w_{l,ij}`` is multiplied by ``1 - min(a^{<t}_{l,i}, a^{<t}_{l-1,j})`` (Eq. 2; a bias by
  ``1 - a^{<t}_{l,i}``; the input layer has no gate), where ``a^{<t} = max(a^{<t-1}, a^{t-1})`` is the units'
  cumulative use by the earlier tasks (Eq. 1, kept in the encoder's ``used`` buffers): what earlier tasks use does not
  move, so their outputs stay as they were wherever their gates are exactly 0 or 1.
- the embedding's gradient is compensated for the annealing, ``q' = smax/s · (cosh(s e) + 1)/(cosh(e) + 1) · q``
  (the equation before Eq. 4, with s e clamped to ±50 as in the authors' code), and the embedding is clamped to
  ±6 (``thres_emb``) after every update.
- the loss gains the mask regulariser (Eqs. 4-5) ``c Σ_l Σ_i a^t_{l,i}(1 - a^{<t}_{l,i}) / Σ_l Σ_i (1 -
  a^{<t}_{l,i})`` (for the first task, c times the gates' mean), which keeps units free for later tasks.

The strategy ``hat`` is task-incremental (the task id is given at test time: each task reads the encoder through its
own experience's gates); ``tpl`` (:mod:`.tpl`) builds on the same :class:`HatMLP` and :class:`HatTraining` for the
class scenario.

Differences, documented: only the hidden units of an MLP backbone (``model.backbone: mlp``) are gated (the paper also
gates convolution filters); the heads are the architecture's per-task heads and are not gated. The embedding clamp
runs before each step's forward (and when an experience ends) instead of right after each update: nothing reads the
embeddings in between except evaluation at s = smax, where a clamped and an unclamped embedding give the same gate
(σ(400 · 6) is 1 in float32). The authors' optimiser is plain SGD with the masks applied to the gradients; here any
optimiser of the run masks the gradients it is given (each experience starts a fresh optimiser, so momentum and Adam's
moments never carry a protected coordinate), and weight decay, which would move protected weights, is refused.
Gradient accumulation (``train.accumulate`` > 1) anneals s over the epoch's batches, so s stops short of smax. The
TPL and MORE code anneal ``s = 1/smax + (smax - 1/smax) b/B`` (b 0-based: the last batch stays below smax); here the
paper's Eq. 3 (the last batch at smax).
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


class HatParams(BaseModel):
    """Parameters of ``hat`` (and of the HAT part of ``tpl``); the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")
    smax: float = Field(400.0, ge=1, description="the largest gate slope s (evaluation uses it; the paper: 400)")
    c: float = Field(0.75, ge=0, description="weight of the mask regulariser (Eqs. 4-5; the paper: 0.75)")
    thres_cosh: float = Field(50.0, gt=0, description="clamp of s·e in the embedding gradient compensation")
    thres_emb: float = Field(6.0, gt=0, description="embeddings are clamped to [-thres_emb, thres_emb]")


# ---------------------------------------------------------------- the math


def anneal(batch: int, batches: int, smax: float) -> float:
    """Eq. 3: the gate slope of 0-based ``batch`` of an epoch of ``batches``, from 1/smax (first) to smax (last)."""
    if batches <= 1:
        return smax
    return 1 / smax + (smax - 1 / smax) * min(batch, batches - 1) / (batches - 1)


def gate(e: Tensor, s: float) -> Tensor:
    """The attention mask ``σ(s e)`` of a task embedding."""
    return torch.sigmoid(s * e)


def weight_factor(used_out: Tensor, used_in: Tensor | None) -> Tensor:
    """Eq. 2: the factor ``1 - min(a^{<t}_{l,i}, a^{<t}_{l-1,j})`` of the gradient of weight (i, j) of a linear layer
    (out x in); ``used_in`` None: the input layer, ``1 - a^{<t}_{l,i}``."""
    if used_in is None:
        return (1 - used_out)[:, None]
    return 1 - torch.minimum(used_out[:, None], used_in[None, :])


def compensation(e: Tensor, s: float, smax: float, thres_cosh: float) -> Tensor:
    """The embedding gradient's factor ``smax/s · (cosh(s e) + 1) / (cosh(e) + 1)`` (s e clamped to ±thres_cosh)."""
    return smax / s * (torch.cosh(torch.clamp(s * e, -thres_cosh, thres_cosh)) + 1) / (torch.cosh(e) + 1)


def mask_regulariser(masks: Sequence[Tensor], used: Sequence[Tensor], c: float) -> Tensor:
    """Eqs. 4-5: ``c Σ a^t (1 - a^{<t}) / Σ (1 - a^{<t})`` over every gated unit (zero when no unit is free)."""
    num = sum((m * (1 - u)).sum() for m, u in zip(masks, used, strict=True))
    den = sum((1 - u).sum() for u in used)
    assert isinstance(num, Tensor) and isinstance(den, Tensor)
    return c * num / den if float(den) > 0 else num * 0


# ---------------------------------------------------------------- the gated encoder

_MLP_PARTS = (nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout)


class HatMLP(nn.Module):
    """An MLP encoder (polytask's ``mlp`` backbone: Flatten, then Linear + ReLU (+ Dropout) blocks) whose hidden units
    are gated per task: ``embeddings[l]`` holds one row per task slot, buffer ``used{l}`` each unit's cumulative use
    by the tasks learnt so far (Eq. 1). ``forward(x, task, s)``: the representation through task ``task``'s gates at
    slope ``s`` (default: ``self.task``; ``self.s`` in train mode, ``smax`` in eval mode)."""

    def __init__(self, layers: nn.Sequential, slots: int, smax: float) -> None:
        super().__init__()
        self.layers = layers
        self.linears = [m for m in layers if isinstance(m, nn.Linear)]
        self.embeddings = nn.ParameterList([nn.Parameter(torch.randn(slots, lin.out_features))
                                            for lin in self.linears])
        for i, lin in enumerate(self.linears):
            self.register_buffer(f"used{i}", torch.zeros(lin.out_features))
        self.smax = smax
        self.task = 0
        self.s = smax

    @property
    def used(self) -> list[Tensor]:
        """Each gated layer's cumulative unit use ``a^{<t}`` (Eq. 1)."""
        return [getattr(self, f"used{i}") for i in range(len(self.linears))]

    @property
    def width(self) -> int:
        """The representation's width (the last hidden layer)."""
        return self.linears[-1].out_features

    def masks(self, task: int, s: float) -> list[Tensor]:
        """Task ``task``'s gates of every hidden layer at slope ``s``."""
        return [gate(e[task], s) for e in self.embeddings]

    def forward(self, x: Tensor, task: int | None = None, s: float | None = None) -> Tensor:
        task = self.task if task is None else task
        s = (self.s if self.training else self.smax) if s is None else s
        masks = self.masks(task, s)
        layer = -1
        for m in self.layers:
            if isinstance(m, nn.Linear):
                if layer >= 0:
                    x = x * masks[layer]
                layer += 1
            x = m(x)
        return x * masks[layer]

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Eq. 2 on the gradients of the linear layers (a no-op before any task is remembered)."""
        used = self.used
        for i, lin in enumerate(self.linears):
            if lin.weight.grad is not None:
                lin.weight.grad.mul_(weight_factor(used[i], used[i - 1] if i else None))
            if lin.bias is not None and lin.bias.grad is not None:
                lin.bias.grad.mul_(1 - used[i])

    @torch.no_grad()
    def compensate(self, s: float, thres_cosh: float) -> None:
        """The annealing compensation of the embeddings' gradients."""
        for e in self.embeddings:
            if e.grad is not None:
                e.grad.mul_(compensation(e.detach(), s, self.smax, thres_cosh))

    @torch.no_grad()
    def clamp(self, thres_emb: float) -> None:
        """Keep every embedding in [-thres_emb, thres_emb]."""
        for e in self.embeddings:
            e.clamp_(-thres_emb, thres_emb)

    @torch.no_grad()
    def remember(self, task: int) -> None:
        """Eq. 1: fold task ``task``'s gates at smax into the cumulative use."""
        for u, m in zip(self.used, self.masks(task, self.smax), strict=True):
            u.copy_(torch.maximum(u, m))


def hat_encoder(model: nn.Module, slots: int, smax: float, label: str) -> tuple[HatMLP, HardSharing]:
    """The gated encoder built on ``model``'s MLP encoder (the model must be hard sharing over an ``mlp`` backbone with
    at least one hidden layer), and the model."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(model, HardSharing) or not isinstance(encoder, nn.Sequential) \
            or not all(isinstance(m, _MLP_PARTS) for m in encoder) \
            or not any(isinstance(m, nn.Linear) for m in encoder):
        raise ConfigError(f"strategy {label}: HAT gates the hidden units of an MLP; use model.backbone: mlp with at "
                          "least one hidden layer (model.backbone_params.hidden) and model.architecture: hard")
    if any(not p.requires_grad for p in encoder.parameters()):
        raise ConfigError(f"strategy {label}: the MLP encoder is frozen; HAT trains it")
    return HatMLP(encoder, slots, smax), model


def gated(model: nn.Module, label: str) -> HatMLP:
    """The :class:`HatMLP` of a model a HAT-based strategy wrapped."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, HatMLP):
        raise ConfigError(f"strategy {label}: the model being trained is not the one the strategy wrapped "
                          f"({type(model).__name__} has no HAT encoder)")
    return encoder


class HatTraining:
    """HAT's part of every step and of every experience's end, shared by ``hat`` and ``tpl``: set the task and the
    annealed slope, clamp the embeddings (``on_step``), the mask regulariser (``loss``), the gradient masks and the
    compensation (``before_update``), the cumulative masks (``end``)."""

    def __init__(self, params: HatParams, label: str) -> None:
        self.params, self.label = params, label

    def init(self, run: Any, index: int) -> None:
        """Refuse weight decay (it would move protected weights); point the encoder at experience ``index``."""
        for g in run.optimizer.param_groups:
            if float(g.get("weight_decay", 0) or 0) > 0:
                raise ConfigError(f"strategy {self.label}: train.optimizer.weight_decay must be 0 (got "
                                  f"{g['weight_decay']}): weight decay moves the weights HAT protects")
        gated(run.model, self.label).task = index

    def on_step(self, run: Any, step: Any, index: int) -> None:
        """Experience ``index``'s gates at the slope of this batch of the epoch (Eq. 3)."""
        encoder = gated(run.model, self.label)
        encoder.clamp(self.params.thres_emb)
        encoder.task = index
        encoder.s = anneal(step.step, run.data.steps_per_epoch(), self.params.smax)

    def loss(self, run: Any) -> Tensor:
        """The mask regulariser (Eqs. 4-5) of the current task at the current slope."""
        encoder = gated(run.model, self.label)
        return mask_regulariser(encoder.masks(encoder.task, encoder.s), encoder.used, self.params.c)

    def before_update(self, run: Any) -> None:
        """Eq. 2 on the shared weights' gradients, then the embeddings' compensation."""
        encoder = gated(run.model, self.label)
        encoder.mask_gradients()
        encoder.compensate(encoder.s, self.params.thres_cosh)

    def end(self, model: nn.Module, index: int) -> None:
        """Clamp the embeddings (the last update's) and remember experience ``index``'s gates."""
        encoder = gated(model, self.label)
        encoder.clamp(self.params.thres_emb)
        encoder.remember(index)


# ---------------------------------------------------------------- hat: the task-incremental strategy


class HatModel(MultiTaskModel):
    """The task-incremental HAT model: the gated encoder and the architecture's per-task heads. In train mode every
    task reads the encoder through the training experience's gates at the annealed slope; in eval mode each task
    through its own experience's gates at smax (the task id is given)."""

    def __init__(self, encoder: HatMLP, heads: nn.ModuleDict, experience_of: dict[str, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads
        self.task_names = list(heads.keys())
        self.experience_of = dict(experience_of)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = list(tasks or self.task_names)
        if self.training:
            h = self.encoder(x)
            return {t: self.heads[t](h) for t in names}
        seen: dict[int, Tensor] = {}
        out = {}
        for t in names:
            j = self.experience_of[t]
            if j not in seen:
                seen[j] = self.encoder(x, j)
            out[t] = self.heads[t](seen[j])
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()


class Hat(Strategy):
    """HAT (module docstring): per-task hard attention masks on the hidden units, task id given at test time."""

    name = "hat"
    scenarios = ("task", "multitask")

    def __init__(self, params: HatParams) -> None:
        super().__init__()
        self.params = params
        self.hat = HatTraining(params, self.name)

    def wrap(self, model: nn.Module, stream: Stream) -> nn.Module:
        encoder, base = hat_encoder(model, len(stream.experiences), self.params.smax, self.name)
        experience_of: dict[str, int] = {}
        for i, e in enumerate(stream.experiences):
            for t in e.tasks:
                experience_of.setdefault(t.name, i)
        return HatModel(encoder, base.heads, experience_of)

    def init(self, run: Any) -> None:
        self.hat.init(run, self.index)

    def on_step(self, run: Any, step: Any) -> None:
        self.hat.on_step(run, step, self.index)

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        return self.hat.loss(run) if self.params.c else None

    def before_update(self, run: Any, step: Any) -> None:
        self.hat.before_update(run)

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        self.hat.end(model, index)


@STRATEGIES.register("hat", params=HatParams,
                     summary="hard attention to the task: learnt per-task masks on the hidden units, gradients of "
                     "units earlier tasks use blocked (task-incremental)",
                     paper="Serrà et al. 2018, Overcoming catastrophic forgetting with hard attention to the task, "
                     "ICML")
def _hat(params: HatParams) -> Strategy:
    return Hat(params)
