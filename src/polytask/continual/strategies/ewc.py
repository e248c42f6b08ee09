"""Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks",
PNAS; Eq. 3) and its online form (Schwarz et al. 2018, "Progress & Compress", ICML, Eq. 4-5; Chaudhry et al. 2018,
"Riemannian Walk", ECCV: EWC++).

After experience k, the diagonal Fisher information F_k of the log-likelihood of its training data is measured at the
weights θ*_k the experience left; later experiences minimise ``L(θ) + λ/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²``.
``mode: separate`` keeps one (F_k, θ*_k) per past experience (the paper); ``mode: online`` keeps one running Fisher
``F ← γ F + F_k`` and the latest anchor θ*_k (Progress & Compress; its penalty uses γF, which is this one with λγ).

Fisher (``fisher``): ``empirical`` (default, as Avalanche and most implementations) is ``mean_x (∇_θ log p(y|x))²``
at the dataset labels y; ``true`` is ``mean_x E_{y~p(.|x)} (∇_θ log p(y|x))²``, the expectation taken exactly (one
gradient per class, weighted by its probability; for a regression output, whose loss is the negative log-likelihood
of a Gaussian of variance D/2 over its D values, that is ``(2/D) Σ_d (∇f_d)²``). An experience with several tasks
sums their log-likelihoods (independent outputs; a missing label contributes nothing). Both use per-example
gradients, as the definition does; Avalanche's EWCPlugin squares mini-batch mean gradients instead (a smaller,
batch-size-dependent estimate) and its penalty has no 1/2 (its ``ewc_lambda`` is this λ/2).

Parameters: every trainable parameter, shared and heads. A head only a later task uses has zero Fisher under every
earlier experience and is left out of the penalty; a past task's head in the task scenario keeps its Fisher and
anchor (it gets no task gradient later, so the penalty only matters with weight decay or a shared head).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from polytask.continual.strategies.regularization import Params, Quadratic, RowFn, nonzero, row_mean, snapshot
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream
from polytask.tasks.task import Task, TaskData

FisherKind = Literal["empirical", "true"]


def _log_likelihood_scores(tasks: Sequence[Task], kind: FisherKind) -> RowFn:
    """The per-row scores whose squared gradients summed give the Fisher: the row's negative log-likelihood
    (empirical), or each output's score weighted by the square root of its probability (true)."""
    by_name = {t.name: t for t in tasks}

    def scores(out: Mapping[str, Tensor], y: Mapping[str, Tensor], labelled: Mapping[str, Tensor]) -> Tensor:
        if kind == "empirical":
            nll = sum(labelled[n] * by_name[n].loss(out[n][None], y[n][None])[0] for n in y)
            return torch.as_tensor(nll)[None]
        parts = []
        for n in y:
            task = by_name[n]
            if task.kind == "classification":
                logp = F.log_softmax(out[n], -1)
                parts.append(labelled[n] * logp.detach().exp().sqrt() * logp)
            else:
                parts.append(labelled[n] * (2.0 / task.n_outputs) ** 0.5 * out[n].reshape(-1))
        return torch.cat(parts)

    return scores


def fisher_diagonal(model: nn.Module, sources: Sequence[TaskData], tasks: Sequence[Task], kind: FisherKind,
                    device: torch.device) -> Params:
    """Diagonal Fisher information of the trainable parameters, ``mean over the rows of sources`` of the squared
    per-example gradient of the log-likelihood of ``tasks`` (module docstring: empirical or true)."""
    scores = 1 if kind == "empirical" else sum(t.n_outputs for t in tasks)
    return row_mean(model, sources, [t.name for t in tasks], _log_likelihood_scores(tasks, kind), torch.square,
                    device, scores)


def online_fisher(running: Mapping[str, Tensor], new: Mapping[str, Tensor], decay: float) -> Params:
    """``F ← γ F + F_new`` per parameter (a parameter missing from one side counts zero there)."""
    out = {n: decay * v for n, v in running.items()}
    for n, v in new.items():
        out[n] = out[n] + v if n in out else v.clone()
    return out


class EWCParams(BaseModel):
    """Parameters of ``ewc``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lam: float = Field(100.0, ge=0, alias="lambda", description="λ: the penalty λ/2 Σ F (θ − θ*)² (100 suits split-"
                       "digits with SGD at lr 0.01; SGD stays stable while λ · max F · lr is below about 2(1 + "
                       "momentum), so a larger lr needs a smaller λ)")
    mode: Literal["separate", "online"] = Field("separate", description="separate: one Fisher and anchor per past "
                                                "experience; online: one running Fisher, the latest anchor")
    decay: float | None = Field(None, ge=0, le=1, description="online: γ in F ← γF + F_new (default 1)")
    fisher: FisherKind = Field("empirical", description="empirical: at the dataset labels; true: the expectation "
                               "over the model's predictive distribution")

    @model_validator(mode="after")
    def _decay_is_online(self) -> EWCParams:
        if self.decay is not None and self.mode != "online":
            raise ValueError("decay applies to mode: online only (separate keeps every Fisher as it was)")
        return self


class EWC(Quadratic):
    """EWC: after each experience, its Fisher and anchor; then the penalty λ/2 Σ_k F_k (θ − θ*_k)²."""

    name = "ewc"

    def __init__(self, params: EWCParams) -> None:
        super().__init__(params.lam / 2)
        self.params = params

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        e = stream.experiences[index]
        fisher = fisher_diagonal(model, e.suite.splits["train"], e.tasks, self.params.fisher, device)
        if self.params.mode == "online" and self.terms:
            decay = 1.0 if self.params.decay is None else self.params.decay
            fisher = online_fisher(self.terms[0][0], fisher, decay)
        fisher = nonzero(fisher)
        pair = (fisher, snapshot(model, list(fisher)))
        self.terms = [pair] if self.params.mode == "online" else [*self.terms, pair]


@STRATEGIES.register("ewc", params=EWCParams,
                     summary="elastic weight consolidation: a Fisher-weighted pull to past weights (separate/online)",
                     paper="Kirkpatrick et al. 2017 (PNAS); online: Schwarz et al. 2018 (Progress & Compress)")
def _ewc(params: EWCParams) -> Strategy:
    return EWC(params)
