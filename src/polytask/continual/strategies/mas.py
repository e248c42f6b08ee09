"""Memory Aware Synapses (Aljundi et al. 2018, "Memory aware synapses: learning what (not) to forget", ECCV;
Eq. 2-4).

After each experience, the importance of every parameter is how sensitive the learned function's output is to it,
averaged over the experience's inputs (no labels needed): ``Ω_new = (1/N) Σ_x |∂ ||f(x)||²₂ / ∂θ|`` (Eq. 4: the
gradient of the squared L2 norm of the output, per input, in absolute value), with f(x) the outputs (logits) of the
experience's tasks' heads, concatenated. The importances accumulate over experiences, ``Ω ← Ω + Ω_new`` (the paper),
and later experiences minimise ``L(θ) + λ Σ_i Ω_i (θ_i − θ*_i)²`` (Eq. 3) with θ* the weights after the latest
experience.

Avalanche's MASPlugin (after FACIL) differs: it takes the gradient of the batch mean of the (unsquared) output norm,
so the absolute value is of a mini-batch gradient rather than per input; it averages importances,
``Ω ← α Ω + (1 − α) Ω_new`` with α = 0.5 (set ``alpha`` here for that rule); and its penalty is halved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.continual.strategies.regularization import Params, Quadratic, nonzero, row_mean, snapshot
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream
from polytask.tasks.task import TaskData


def _squared_output_norm(out: Mapping[str, Tensor], y: Mapping[str, Tensor], labelled: Mapping[str, Tensor]) -> Tensor:
    return sum(v.pow(2).sum() for v in out.values())[None]  # type: ignore[index]


def output_sensitivity(model: nn.Module, sources: list[TaskData] | tuple[TaskData, ...], tasks: list[str],
                       device: torch.device) -> Params:
    """MAS's importance: ``mean over the rows of sources`` of ``|∂ ||f(x)||²₂ / ∂θ|``, f the outputs of ``tasks``."""
    return row_mean(model, sources, tasks, _squared_output_norm, torch.abs, device)


def accumulate(running: Mapping[str, Tensor], new: Mapping[str, Tensor], alpha: float | None) -> Params:
    """``Ω ← Ω + Ω_new`` (alpha None, the paper) or ``Ω ← α Ω + (1 − α) Ω_new`` (Avalanche); a name missing on one
    side counts zero there."""
    keep, add = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    out = {n: keep * v for n, v in running.items()}
    for n, v in new.items():
        out[n] = out[n] + add * v if n in out else add * v
    return out


class MASParams(BaseModel):
    """Parameters of ``mas``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lam: float = Field(1.0, ge=0, alias="lambda", description="λ: the penalty λ Σ Ω (θ − θ*)²")
    alpha: float | None = Field(None, ge=0, lt=1, description="None: Ω ← Ω + Ω_new (the paper); a value: "
                                "Ω ← αΩ + (1−α)Ω_new (Avalanche's running average, its default 0.5)")


class MAS(Quadratic):
    """Memory Aware Synapses: importance from the output's sensitivity to each parameter (unsupervised)."""

    name = "mas"

    def __init__(self, params: MASParams) -> None:
        super().__init__(params.lam)
        self.params = params

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        e = stream.experiences[index]
        new = output_sensitivity(model, e.suite.splits["train"], [t.name for t in e.tasks], device)
        importance = nonzero(accumulate(self.terms[0][0] if self.terms else {}, new, self.params.alpha))
        self.terms = [(importance, snapshot(model, list(importance)))]


@STRATEGIES.register("mas", params=MASParams,
                     summary="memory aware synapses: importance from the output's sensitivity to each weight",
                     paper="Aljundi et al. 2018 (ECCV)")
def _mas(params: MASParams) -> Strategy:
    return MAS(params)
