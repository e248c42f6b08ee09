"""The shared core of the regularisation strategies (EWC, online EWC, SI, MAS): a quadratic penalty that ties each
parameter to an anchor in proportion to its importance, and per-example gradients to measure importances.

All three have the form ``coefficient * Σ_k Σ_i Ω_k,i (θ_i − θ*_k,i)²`` over stored (importance Ω_k, anchor θ*_k)
pairs; they differ only in how Ω is measured (Fisher information, path integral, output sensitivity) and how it
accumulates over experiences. The parameters are the model's trainable ones, shared and heads alike; an entry whose
importance is zero everywhere (a head that no past experience used, e.g. a later task's head in the task scenario)
is left out of the penalty, so such a parameter gets no gradient from it and is trained exactly as by ``naive``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from polytask.continual.strategy import Strategy
from polytask.models.mode import evaluating
from polytask.tasks.task import Task, TaskData

Params = dict[str, Tensor]
RowFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters that train (``requires_grad``), by name: what the strategies protect."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module, names: Sequence[str] | None = None) -> Params:
    """Detached copies of the trainable parameters, or of the parameters ``names`` (trainable or not: an importance
    may outlive the experience that trained a weight now frozen): an anchor θ*."""
    params = trainable(model) if names is None else dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in (names if names is not None else params)}


def nonzero(importance: Mapping[str, Tensor]) -> Params:
    """The entries of an importance that are not zero everywhere (only those enter a penalty)."""
    return {n: v for n, v in importance.items() if bool(v.ne(0).any())}


def quadratic_penalty(params: Mapping[str, Tensor], terms: Sequence[tuple[Mapping[str, Tensor],
                                                                        Mapping[str, Tensor]]]) -> Tensor:
    """``Σ_k Σ_i Ω_k,i (θ_i − θ*_k,i)²`` over the (importance Ω_k, anchor θ*_k) pairs ``terms``, for the current
    parameters ``params`` (its gradient is ``2 Σ_k Ω_k (θ − θ*_k)``); names absent from an importance count zero, and
    names absent from ``params`` (parameters frozen now, as a strategy that freezes earlier experiences' weights does:
    they cannot move, their terms are constant) are left out."""
    total: Tensor | None = None
    for importance, anchor in terms:
        for n, omega in importance.items():
            if n not in params:
                continue
            term = (omega * (params[n] - anchor[n]).pow(2)).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(iter(params.values())).device)
    return total


def to_device(tree: Any, device: torch.device) -> Any:
    """A state tree (dicts, lists, tuples, tensors) with its tensors on ``device`` (the same objects if already)."""
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def row_jacobians(model: nn.Module, sources: Sequence[TaskData], tasks: Sequence[str], fn: RowFn,
                  device: torch.device, scores: int = 1, budget: int = 2**24) -> Iterator[Params]:
    """Per-example Jacobians of ``fn`` with respect to the trainable parameters, over every row of ``sources``:
    yields, chunk by chunk, name -> (rows, m, *shape) where ``fn(outputs, y, labelled)`` maps one row's outputs of
    ``tasks`` (name -> (n_outputs,)), its labels (name -> value; NaN replaced by 0) and its label mask (name -> 0/1)
    to m (``scores``) values. The model is evaluated in eval mode (no dropout draws, batch-norm statistics fixed)
    with ``torch.func``, one vectorised pass per chunk of rows whose Jacobians hold about ``budget`` numbers; its
    ``.grad`` and training mode are left as they were."""
    params = {n: p.detach() for n, p in trainable(model).items()}
    names = list(tasks)
    chunk = max(1, budget // max(1, scores * sum(p.numel() for p in params.values())))

    def one(p: Params, xi: Tensor, y: Mapping[str, Tensor], m: Mapping[str, Tensor]) -> Tensor:
        out = functional_call(model, p, (xi[None], names))
        return fn({k: v[0] for k, v in out.items()}, y, m)

    per_row = vmap(jacrev(one), in_dims=(None, 0, 0, 0))
    with evaluating(model):
        for src in sources:
            y = {t: src.y[t] for t in names if t in src.y}
            for s in range(0, len(src), chunk):
                yb = {t: v[s:s + chunk].to(device) for t, v in y.items()}
                labelled = {t: Task.mask(v).to(v.dtype) for t, v in yb.items()}
                clean = {t: torch.nan_to_num(v, nan=0.0) for t, v in yb.items()}
                yield per_row(params, src.x[s:s + chunk].to(device), clean, labelled)


def row_mean(model: nn.Module, sources: Sequence[TaskData], tasks: Sequence[str], fn: RowFn,
             reduce: Callable[[Tensor], Tensor], device: torch.device, scores: int = 1) -> Params:
    """``(1/N) Σ_rows Σ_j reduce(∂ fn_j / ∂θ)`` over the N rows of ``sources`` (see :func:`row_jacobians`): the
    diagonal Fisher with ``reduce=torch.square``, MAS's importance with ``torch.abs``."""
    total = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
    for jac in row_jacobians(model, sources, tasks, fn, device, scores):
        for n, j in jac.items():
            total[n] += reduce(j).sum((0, 1))
    rows = sum(len(s) for s in sources)
    return {n: (v / rows).detach() for n, v in total.items()}


class Quadratic(Strategy):
    """Base of the quadratic regularisers: adds ``coefficient * quadratic_penalty`` over ``self.terms`` (pairs of
    importance and anchor) to every step of every experience after the first; subclasses fill ``terms`` in ``end``.
    Its state is the pairs (plus what a subclass adds in ``extra_state``)."""

    def __init__(self, coefficient: float) -> None:
        super().__init__()
        self.coefficient = coefficient
        self.terms: list[tuple[Params, Params]] = []

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        if not self.terms:
            return None
        self.terms = to_device(self.terms, run.device)
        penalty = quadratic_penalty(trainable(run.model), self.terms)
        return self.coefficient * penalty if penalty.requires_grad else None  # None: every protected weight frozen

    def extra_state(self) -> dict[str, Any]:
        """What a subclass keeps besides the pairs."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def state_dict(self) -> Any:
        return {"terms": [{"importance": imp, "anchor": anchor} for imp, anchor in self.terms],
                **self.extra_state()}

    def load_state_dict(self, state: Any) -> None:
        self.terms = [(t["importance"], t["anchor"]) for t in state["terms"]]
        self.load_extra_state(state)
