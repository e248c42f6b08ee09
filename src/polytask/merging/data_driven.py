"""Data-driven merging for models polytask can run: each task has a fine-tuned encoder and its own head;
the encoders are merged, every task keeps its head.

Fisher merging and RegMean use a few inputs of each task to weight the merge in closed form; AdaMerging
and DivMerge learn merge coefficients on unlabelled inputs by gradient descent through the merged model.
The math (closed forms, objectives) is in small functions; :class:`TaskModels` carries the models and
inputs they run on.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from polytask.errors import ConfigError
from polytask.merging.methods import METHODS, _Params, canonical_method, check_weights
from polytask.merging.stream import merge_state_dicts
from polytask.tasks.task import Task

StateDict = dict[str, Tensor]


@dataclass
class TaskModels:
    """A pretrained encoder, one fine-tuned encoder and head per task, and inputs of each task.

    ``encoder`` is a module with the encoder's architecture (its own weights are not used: every call
    passes explicit parameters). ``inputs[k]`` are unlabelled inputs of task k (AdaMerging, DivMerge);
    ``train_inputs[k]``/``train_targets[k]`` are training rows of task k (Fisher, RegMean).
    """

    encoder: nn.Module
    pretrained: StateDict
    encoders: list[StateDict]
    heads: list[nn.Module]
    tasks: list[Task]
    inputs: list[Tensor]
    train_inputs: list[Tensor]
    train_targets: list[Tensor | None]

    def __post_init__(self) -> None:
        k = len(self.encoders)
        if not (len(self.heads) == len(self.tasks) == len(self.inputs) == len(self.train_inputs) == k):
            raise ConfigError("TaskModels: encoders, heads, tasks and inputs must have one entry per task")
        self.heads = [_frozen(h) for h in self.heads]

    def permuted(self, order: Sequence[int]) -> TaskModels:
        """The same models and data with the tasks in ``order`` (for order-invariance checks)."""
        pick = [list(v) for v in (self.encoders, self.heads, self.tasks, self.inputs, self.train_inputs,
                                  self.train_targets)]
        return TaskModels(self.encoder, self.pretrained, *[[v[i] for i in order] for v in pick])


def _frozen(m: nn.Module) -> nn.Module:
    m = copy.deepcopy(m).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _float_names(state: StateDict) -> list[str]:
    return [n for n, t in state.items() if t.is_floating_point()]


def _classification(ctx: TaskModels, method: str) -> None:
    bad = [t.name for t in ctx.tasks if t.kind != "classification"]
    if bad:
        raise ConfigError(f"method {method!r} needs classification tasks (predicted distributions); "
                          f"{bad[0]!r} is {ctx.tasks[[t.name for t in ctx.tasks].index(bad[0])].kind}")


def _task_generator(seed: int, task: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}\0{task}".encode()))


def _logits(ctx: TaskModels, k: int, state: StateDict, x: Tensor) -> Tensor:
    return ctx.heads[k](functional_call(ctx.encoder, state, (x,)))


# ---------------------------------------------------------------- Fisher merging


class FisherParams(_Params):
    n_examples: int = Field(256, ge=1, description="training inputs per task used to estimate the Fisher")
    labels: Literal["expected", "sample", "true"] = Field(
        "expected", description="expected: the exact expectation over the classes of the model's predictive "
        "distribution (the paper's Fisher, as its official code computes it: one gradient per class); sample: "
        "one y drawn from it per input (a one-sample estimate, one gradient per input); true: the dataset "
        "labels (the 'empirical Fisher')")
    epsilon: float = Field(1e-8, ge=0, description="added to every Fisher value (a parameter no task informs is "
                           "then averaged)")


def diagonal_fisher(encoder: nn.Module, head: nn.Module, state: StateDict, x: Tensor, y: Tensor | None = None,
                    *, expected: bool = False, generator: torch.Generator | None = None,
                    batch_size: int = 64) -> StateDict:
    """Diagonal Fisher of the encoder parameters, ``mean_i E_{y ~ p(.|x_i)} (d log p(y|x_i) / d theta)^2``
    (Matena & Raffel 2022), with per-example gradients. ``expected``: the expectation exactly, summing the
    C classes weighted by their probabilities (the official code); otherwise ``y`` None draws one y_i per
    input from the model's predictive distribution, and given labels ``y`` give the empirical Fisher."""
    params = {n: state[n].detach() for n in _float_names(state)}
    buffers = {n: t for n, t in state.items() if n not in params}

    def log_prob(p: StateDict, xi: Tensor, yi: Tensor) -> Tensor:
        out = head(functional_call(encoder, {**p, **buffers}, (xi[None],)))
        return F.log_softmax(out, -1)[0].gather(0, yi[None])[0]

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(t) for n, t in params.items()}
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        if y is not None:
            labels = [(y[s:s + batch_size].long(), None)]
        else:
            with torch.no_grad():
                probs = F.softmax(head(functional_call(encoder, state, (xb,))), -1)
            if expected:
                labels = [(torch.full((len(xb),), c), probs[:, c]) for c in range(probs.shape[1])]
            else:
                labels = [(torch.multinomial(probs, 1, generator=generator)[:, 0], None)]
        for yb, weight in labels:
            g = per_example(params, xb, yb)
            for n in total:
                sq = g[n].pow(2)
                total[n] += (sq if weight is None else sq * weight.reshape(-1, *[1] * (sq.dim() - 1))).sum(0)
    return {n: t / len(x) for n, t in total.items()}


def fisher_average(states: Sequence[StateDict], fishers: Sequence[StateDict], weights: Sequence[float],
                   epsilon: float = 1e-8) -> StateDict:
    """Fisher merging (Matena & Raffel 2022): ``sum_k w_k F_k theta_k / sum_k w_k F_k`` per parameter."""
    out = {}
    for n in states[0]:
        if n not in fishers[0]:
            out[n] = states[0][n].clone()
            continue
        num = torch.zeros_like(states[0][n], dtype=torch.float64)
        den = torch.zeros_like(num)
        for s, f, w in zip(states, fishers, weights, strict=True):
            fw = w * (f[n].double() + epsilon)
            num += fw * s[n].double()
            den += fw
        out[n] = (num / den).to(states[0][n].dtype)
    return out


@METHODS.register("fisher", params=FisherParams, summary="per-parameter average weighted by each task's "
                  "diagonal Fisher information", paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted "
                  "Averaging", kind="data", per_model=(), order_invariant=True, uses_weights=True, needs_base=False,
                  weight_sum="positive", identity=lambda k: {})
def fisher(params: FisherParams, ctx: TaskModels, weights: Sequence[float], seed: int = 0) -> StateDict:
    """Fisher merging (Matena & Raffel 2022): each encoder parameter is the average of the task models'
    values weighted by their diagonal Fisher on that task's inputs (times the model weight). The Fisher is
    the exact expectation over classes by default, as in the official code (mmatena/model_merging); the
    one-sample estimate (``labels: sample``) costs one gradient per input instead of one per class."""
    _classification(ctx, "fisher")
    fishers = []
    for k, task in enumerate(ctx.tasks):
        x = ctx.train_inputs[k][:params.n_examples]
        y = None
        if params.labels == "true":
            y = ctx.train_targets[k]
            if y is None:
                raise ConfigError("fisher: labels 'true' needs the tasks' training targets")
            y = y[:params.n_examples]
        fishers.append(diagonal_fisher(ctx.encoder, ctx.heads[k], ctx.encoders[k], x, y,
                                       expected=params.labels == "expected",
                                       generator=_task_generator(seed, task.name)))
    return fisher_average(ctx.encoders, fishers, weights, params.epsilon)


# ---------------------------------------------------------------- RegMean


class RegMeanParams(_Params):
    n_examples: int = Field(256, ge=1, description="training inputs per task used for the Gram matrices")
    alpha: float = Field(0.9, ge=0, le=1, description="scale of the Gram matrices' off-diagonal entries (1: exact "
                         "regression, smaller: towards plain averaging)")
    gram: Literal["sum", "mean"] = Field(
        "sum", description="sum: X^T X, the paper's least squares over all rows (a task with more rows weighs "
        "more); mean: X^T X / rows, the reference code's running mean (every task weighs the same)")


def linear_inputs_gram(encoder: nn.Module, state: StateDict, x: Tensor, mean: bool = False) -> dict[str, Tensor]:
    """``X^T X`` of the inputs of every ``nn.Linear`` of the encoder, run with parameters ``state``; with
    ``mean`` divided by the rows that layer saw (RegMean's reference code)."""
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + a.T @ a
            rows[name] = rows.get(name, 0) + a.shape[0]
        return fn

    for name, m in encoder.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            functional_call(encoder, state, (x,))
    finally:
        for h in hooks:
            h.remove()
    return {n: g / max(rows[n], 1) for n, g in grams.items()} if mean else grams


def regmean_weight(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float) -> Tensor:
    """RegMean's closed form (Jin et al. 2023) for one linear layer ``y = x W^T``:
    ``W^T = (sum_k G_k)^-1 sum_k G_k W_k^T`` with ``G_k = X_k^T X_k``, off-diagonals scaled by ``alpha``
    (alpha = 1: the least-squares merge ``argmin_W sum_k ||X_k W^T - X_k W_k^T||^2``).

    An input feature that no task activates (zero on the diagonal of the summed Gram) leaves the objective
    unchanged whatever its weight; it gets the plain average of the task weights. That is one term on the
    summed Gram, not one per task: a feature one task never activates (a dead ReLU) is decided by the tasks
    that do activate it, as the least squares say. A summed Gram that is singular for another reason (fewer
    rows than features) gets the minimum-norm solution.
    """
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros((grams[0].shape[0], weights[0].shape[0]), dtype=torch.float64)
    mean = torch.zeros_like(rhs)
    for w, g in zip(weights, grams, strict=True):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        lhs += g
        rhs += g @ w.double().T
        mean += w.double().T / len(weights)
    dead = torch.diagonal(lhs) == 0
    if bool(dead.any()):
        lhs[dead, dead] = 1.0
        rhs[dead] = mean[dead]
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:
        solution = torch.linalg.pinv(lhs, hermitian=True) @ rhs
    return solution.T.to(weights[0].dtype).contiguous()


@METHODS.register("regmean", params=RegMeanParams, summary="closed-form merge of each linear layer from the Gram "
                  "matrices of its inputs; other parameters averaged",
                  paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean)",
                  kind="data", per_model=(), order_invariant=True, uses_weights=False, needs_base=False,
                  identity=lambda k: {})
def regmean(params: RegMeanParams, ctx: TaskModels, weights: Sequence[float], seed: int = 0) -> StateDict:
    """RegMean (Jin et al. 2023): each linear layer's weight minimises the summed squared difference of its
    outputs from every task model's on that task's inputs; biases and other parameters are averaged.

    Differences from the reference code (bloomberg/dataless-model-merging), each an option: the Gram is the
    sum ``X^T X`` of the paper's objective by default (the code keeps a running mean, ``gram: mean``); the
    off-diagonal scale ``alpha`` applies to every layer (the code uses it for some model families only,
    alpha = 1 elsewhere); features no task activates get the plain average (the code would fail to invert)."""
    grams = [linear_inputs_gram(ctx.encoder, ctx.encoders[k], ctx.train_inputs[k][:params.n_examples],
                                mean=params.gram == "mean") for k in range(len(ctx.tasks))]
    out = merge_state_dicts("average", None, ctx.encoders)
    for layer in grams[0]:
        name = f"{layer}.weight" if layer else "weight"
        out[name] = regmean_weight([e[name] for e in ctx.encoders], [g[layer] for g in grams], params.alpha)
    return out


# ---------------------------------------------------------------- coefficient learning (AdaMerging, DivMerge)


class _CoefParams(_Params):
    granularity: Literal["task", "layer"] = Field(
        "layer", description="task: one coefficient per task vector; layer: one per task vector and parameter tensor")
    steps: int = Field(100, ge=0, description="optimisation steps (Adam)")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the coefficients")
    batch_size: int = Field(64, ge=1, description="unlabelled inputs per task per step")
    n_examples: int = Field(256, ge=1, description="unlabelled inputs per task")


Clamp = Literal["forward", "project", "none"]
_CLAMP = ("coefficients in [0, 1]: forward (the merged model uses clamp(c, 0, 1), the learned c is free: the "
          "official AdaMerging code; a coefficient outside gets no gradient), project (c itself is clamped after "
          "each step: projected gradient descent) or none")


def _clamp_mode(v: Any) -> Any:
    return {True: "project", False: "none"}.get(v, v) if isinstance(v, bool) else v  # the old boolean form


class AdaMergingParams(_CoefParams):
    init: float = Field(0.3, description="initial coefficient (the paper's 0.3)")
    clamp: Clamp = Field("forward", description=_CLAMP)

    _bool_clamp = field_validator("clamp", mode="before")(_clamp_mode)


class DivMergeParams(_CoefParams):
    init: float | None = Field(None, description="initial coefficient (default 1/K: the task-vector mean)")
    clamp: Clamp = Field("none", description=_CLAMP)

    _bool_clamp = field_validator("clamp", mode="before")(_clamp_mode)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of the softmax of each row (AdaMerging's surrogate objective)."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def js_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between the softmax distributions of each row:
    ``JS(P, Q) = KL(P || M)/2 + KL(Q || M)/2`` with ``M = (P + Q)/2`` (DivMerge's objective)."""
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    logm = torch.logsumexp(torch.stack([logp, logq]), 0) - torch.log(torch.tensor(2.0))
    return 0.5 * ((logp.exp() * (logp - logm)).sum(-1) + (logq.exp() * (logq - logm)).sum(-1))


def combine(pretrained: StateDict, taus: Sequence[StateDict], coef: Tensor, names: Sequence[str]) -> StateDict:
    """``theta_0 + sum_k coef_k tau_k``; ``coef`` is (K,) task-wise or (K, len(names)) layer-wise."""
    out = dict(pretrained)
    for j, n in enumerate(names):
        acc = pretrained[n]
        for k, tau in enumerate(taus):
            c = coef[k] if coef.dim() == 1 else coef[k, j]
            acc = acc + c * tau[n]
        out[n] = acc
    return out


def _learn(ctx: TaskModels, params: _CoefParams, init: float, clamp: str, seed: int,
           loss_fn: Any) -> tuple[StateDict, list[float], Tensor]:
    """Learn merge coefficients by Adam on ``loss_fn``; returns the merged state, the loss per step and the
    learned coefficients (as the optimiser holds them: unclamped with ``clamp: forward``)."""
    names = _float_names(ctx.pretrained)
    taus = [{n: e[n] - ctx.pretrained[n] for n in names} for e in ctx.encoders]
    k = len(taus)
    shape = (k,) if params.granularity == "task" else (k, len(names))
    coef = torch.full(shape, float(init), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([coef], lr=params.lr)
    inputs = [x[:params.n_examples] for x in ctx.inputs]
    gens = [_task_generator(seed, t.name) for t in ctx.tasks]
    history = []
    for _ in range(params.steps):
        rows = [torch.randint(len(x), (min(params.batch_size, len(x)),), generator=g)
                for x, g in zip(inputs, gens, strict=True)]
        merged = combine(ctx.pretrained, taus, coef.clamp(0, 1) if clamp == "forward" else coef, names)
        loss = sum(loss_fn(k, merged, inputs[k][r], r) for k, r in enumerate(rows))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clamp == "project":
            with torch.no_grad():
                coef.clamp_(0, 1)
        history.append(float(loss.detach()))
    with torch.no_grad():
        final = coef.detach().clamp(0, 1) if clamp in ("forward", "project") else coef.detach()
        merged = combine(ctx.pretrained, taus, final, names)
    return {n: t.detach().clone() for n, t in merged.items()}, history, coef.detach()


@METHODS.register("adamerging", params=AdaMergingParams, summary="task- or layer-wise coefficients learned by "
                  "minimising prediction entropy on unlabelled test inputs",
                  paper="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning",
                  kind="data", per_model=(), order_invariant=True, uses_weights=False, needs_base=True,
                  identity=lambda k: {"steps": 0, "init": 1.0 / k, "clamp": "none"})
def adamerging(params: AdaMergingParams, ctx: TaskModels, weights: Sequence[float], seed: int = 0) -> StateDict:
    """AdaMerging (Yang et al. 2024): ``theta_0 + sum_k lambda_k(^l) tau_k(^l)`` with coefficients learned by
    Adam on the summed mean entropy of each task head's predictions on that task's unlabelled inputs.

    As in the official code (EnnengYang/AdaMerging), the coefficients are clamped to [0, 1] in the forward
    pass only (``clamp: forward``): the parameter Adam updates stays unclamped, and one that leaves [0, 1]
    gets no gradient from the clamp. ``clamp: project`` clamps the parameter after each step instead."""
    _classification(ctx, "adamerging")

    def loss(k: int, merged: StateDict, x: Tensor, rows: Tensor) -> Tensor:
        return entropy(_logits(ctx, k, merged, x)).mean()

    return _learn(ctx, params, params.init, params.clamp, seed, loss)[0]


@METHODS.register("divmerge", params=DivMergeParams, summary="coefficients minimising the Jensen-Shannon divergence "
                  "between the merged model's and each task model's predictions on unlabelled inputs",
                  paper="Touayouch et al. 2025, DivMerge: A divergence-based model merging method for multi-tasking",
                  kind="data", per_model=(), order_invariant=True, uses_weights=False, needs_base=True,
                  identity=lambda k: {"steps": 0, "init": 1.0 / k})
def divmerge(params: DivMergeParams, ctx: TaskModels, weights: Sequence[float], seed: int = 0) -> StateDict:
    """DivMerge (Touayouch et al. 2025): ``theta_0 + sum_k alpha_k(^l) tau_k(^l)`` with the coefficients
    (task- or layer-level) minimising ``sum_k E_{x in D_k} JS(p_merged(.|x) || p_k(.|x))``: the task models'
    own predictions are the targets, so no labels are needed."""
    _classification(ctx, "divmerge")
    targets = []
    with torch.no_grad():
        for k in range(len(ctx.tasks)):
            targets.append(_logits(ctx, k, ctx.encoders[k], ctx.inputs[k][:params.n_examples]))

    def loss(k: int, merged: StateDict, x: Tensor, rows: Tensor) -> Tensor:
        return js_divergence(_logits(ctx, k, merged, x), targets[k][rows]).mean()

    init = params.init if params.init is not None else 1.0 / len(ctx.tasks)
    return _learn(ctx, params, init, params.clamp, seed, loss)[0]


def merge_encoders(method: str, params: dict[str, Any] | Any, ctx: TaskModels, weights: Sequence[float] | None = None,
                   seed: int = 0) -> StateDict:
    """Merge the task encoders of ``ctx`` with any registered method (data-free ones ignore the data)."""
    method = canonical_method(method)
    entry = METHODS.get(method)
    p = METHODS.params_for(method, params, "params")
    w = [1.0] * len(ctx.encoders) if weights is None else [float(x) for x in weights]
    check_weights(method, w)
    if entry.extra.get("kind") == "data-free":
        return merge_state_dicts(method, ctx.pretrained if entry.extra.get("needs_base") else None,
                                 ctx.encoders, p, w, seed=seed)
    return entry.build(p, ctx, w, seed)
