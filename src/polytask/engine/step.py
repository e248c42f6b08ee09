"""One optimisation step for any method: loss weightings and gradient aggregators.

A weighting turns the K losses into K weights and the step minimises Σ w_k L_k. An aggregator receives
the per-task gradients (their Gramian, or the Jacobian itself) from :mod:`polytask.jacobian`, in
``params`` mode (shared parameters) or ``representation`` mode (shared representation, per sample), and
the step sets the shared gradient to the aggregated direction. Head (task-specific) parameters get their
own task's gradient, scaled by the task weight only where the method says so (``weights_heads``).

Precision (``precision="bf16"``): the forward pass and the task losses run under ``torch.autocast`` (bfloat16, on
the model's device type, CPU or CUDA); the losses and the shared representation are cast back to float32 as they
leave it, so the per-task gradients (feature and parameter Jacobians), the float64 Gramian
(:func:`polytask.jacobian.gramian`), the method's maths (weights, aggregation, state) and the optimiser update are
all in full precision. The parameters stay float32 (autocast casts them per op); the backward passes run in the
dtypes autocast chose for the forward ops.

Gradient accumulation (:func:`accumulated_step`, ``micro`` batches per optimiser step): the method sees the
effective batch, never a micro-batch. Task k's effective loss is the mean over the labelled rows of all micro-batches,
L_k = Σ_m f_km L_km with f_km the share of task k's labelled rows in micro-batch m, so the update equals the one of a
single batch holding all the rows (to float rounding). Loss weightings get their weights from the effective losses
(one no-grad forward pass over the micro-batches, then one forward + backward each with the weights fixed: one extra
forward per micro-batch). Aggregators in ``params`` mode sum the scaled per-task Jacobians (K x P) over the
micro-batches and aggregate once. In ``representation`` mode the per-sample feature gradients of every micro-batch
are kept (K x rows x D, concatenated over micro-batches: the Jacobian of the effective batch, whose Gramian is the
sum of the micro-batch pieces), aggregated once, and the direction is pushed through the encoder micro-batch by
micro-batch, recomputing each encoder forward (one extra encoder forward each). Recomputed forwards restore the RNG
state of the first one (as ``torch.utils.checkpoint`` does), so dropout draws the same masks. F-MTL (``sam_rho``)
needs the whole batch's graph and is refused with accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from polytask.config import MethodConfig
from polytask.engine import faults
from polytask.engine.distributed import Collective, check_method, shard
from polytask.errors import ConfigError
from polytask.jacobian import (
    Block,
    Factored,
    Rows,
    batched_grads,
    combine,
    dense,
    feature_rows,
    flat,
    gramian,
    split,
    through,
)
from polytask.methods import load_all
from polytask.models import MultiTaskModel
from polytask.tasks.task import Task, TaskData
from polytask.weighting.base import State, StepContext

LossFn = Callable[[MultiTaskModel, Sequence[TaskData], Sequence[Tensor], Sequence[Task]], Tensor]
Cast = Callable[[], AbstractContextManager]
PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device | str) -> Cast:
    """The context of a forward pass at ``precision``: ``fp32`` none, ``bf16`` ``torch.autocast`` to bfloat16 on
    ``device``'s type (CPU or CUDA)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp32":
        return nullcontext
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


def full(t: Tensor) -> Tensor:
    """``t`` in at least float32 (a bfloat16 loss or feature leaving autocast; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t


def _cast_losses(loss_fn: LossFn, cast: Cast) -> LossFn:
    if cast is nullcontext:
        return loss_fn

    def run(*args: Any) -> Tensor:
        with cast():
            out = loss_fn(*args)
        return full(out)
    return run


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class Method:
    """A built method and how the loop must feed it."""

    name: str
    kind: str  # "weighting" or "aggregator"
    impl: Any  # Weighting or Aggregator
    weights_heads: bool = False
    needs_val: bool = False
    mode: str = "params"
    chunk: int = 0
    sam_rho: float = 0.0
    unit: bool = False  # a weighting whose weights are fixed at 1 (one task's loss then goes backward as it is)

    def init(self) -> State:
        """The method's fresh state (F-MTL keeps one for the loss step and one for the flat-gradient step)."""
        if self.sam_rho:  # F-MTL aggregates the loss and the flat gradients separately
            return {"main": self.impl.init(), "flat": self.impl.init()}
        return self.impl.init()


def build_method(cfg: MethodConfig, task_names: Sequence[str]) -> Method:
    """Build the registered method ``cfg.name`` with its validated parameters for these tasks, with how the loop
    must feed it (kind, gradient mode, chunking, F-MTL radius); a bad parameter or combination is a ConfigError
    naming ``methods.<label>``."""
    registry = load_all()
    entry = registry.get(cfg.name)
    if entry.extra.get("pareto"):
        raise ConfigError(f"methods.{cfg.label}: {cfg.name} trains a weight ensemble (a model wrapper and its own "
                          "losses, built by a run's jobs): use it in `polytask run` / polytask.run, not in fit, "
                          "JointStep or a continual stream")
    kind = entry.extra.get("kind", "weighting")
    impl = registry.build(cfg.name, cfg.params, list(task_names), where=f"methods.{cfg.label}.params")
    fixed = getattr(impl, "fixed", None) if kind == "weighting" else None
    method = Method(cfg.name, kind, impl, bool(entry.extra.get("weights_heads")), bool(entry.extra.get("needs_val")),
                    cfg.grad_mode, cfg.chunk_size, cfg.sam_rho,
                    fixed is not None and bool((fixed == 1).all()) and impl.after_step is None)
    if kind == "weighting" and cfg.sam_rho:
        raise ConfigError(f"methods.{cfg.label}.sam_rho: F-MTL needs a gradient aggregator (e.g. mean), "
                          f"not the loss weighting {cfg.name!r}")
    if cfg.sam_rho and cfg.grad_mode != "params":
        raise ConfigError(f"methods.{cfg.label}.sam_rho: F-MTL perturbs parameters; use grad_mode: params")
    return method


def step_generator(seed: int, step: int, into: torch.Generator | None = None) -> torch.Generator:
    """The generator of a step's random draws (RLW, PCGrad, GradDrop), a pure function of (seed, step) so a resumed
    run, or the same run driven by :class:`polytask.JointStep`, draws the same numbers. ``into``: a CPU generator to
    reseed (a job's, reused from step to step) instead of a new one."""
    return (torch.Generator() if into is None else into).manual_seed(seed * 1_000_003 + step)


def zero_grad(opt: torch.optim.Optimizer) -> None:
    """``opt.zero_grad(set_to_none=True)``: every gradient of the optimiser's parameters set to None, here, when its
    class keeps torch's own ``zero_grad`` (which does the same behind a profiler record and a compile guard, 6 us a
    step on CPU); else the optimiser's."""
    if type(opt).zero_grad is not torch.optim.Optimizer.zero_grad:
        opt.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def _set_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    """Add ``grads`` into ``.grad`` (as ``loss.backward()`` does; the engine zeroes the gradients first)."""
    for p, g in zip(params, grads, strict=True):
        g = g.detach().reshape(p.shape).to(p.dtype)
        p.grad = g if p.grad is None else p.grad + g


def _aggregate(method: Method, state: State, blocks: Sequence[Block], ctx: StepContext,
               comm: Collective | None = None) -> tuple[list[Tensor], Tensor | None, State]:
    """Aggregate per-task gradient blocks (each K x ..., stacked or as :class:`polytask.jacobian.Rows`) into one
    direction per block; a Gramian aggregator reads the rows where they lie, the others get them stacked.

    ``comm`` (data-parallel representation mode): the blocks are this rank's rows of K x rows x ... blocks whose
    rows are spread over the ranks; the Gramian is then the sum of the ranks' Gramians (no cross terms between
    rows), and a Jacobian-reading aggregator sees every rank's rows (``engine.distributed``)."""
    agg = method.impl
    if agg.input == "gramian":  # float64 Gramian of the blocks; the update J^T w in the gradients' dtype
        g = gramian(blocks)
        if comm is not None:
            (g,) = comm.sum([g])
        weights, state = agg.update(state, g, replace(ctx, grad_dtype=blocks[0].dtype))
        return combine(weights, blocks), weights, state
    blocks = [dense(b) for b in blocks]
    if comm is not None:
        full, starts = comm.gather_rows(blocks)
        direction, state = agg.update(state, flat(full), ctx)
        return [d[s0:s0 + b.shape[1]] for d, s0, b in zip(split(direction, full), starts, blocks, strict=True)], \
            None, state
    direction, state = agg.update(state, flat(blocks), ctx)
    return split(direction, blocks), None, state


@dataclass
class TaskGrads:
    """Per-task gradients of one batch.

    ``zs``: the shared representations (graph attached), one per source; ``z_rows``: per source the K per-sample
    gradients of the task losses (row k: task k's, B x D), kept apart; ``z_blocks``: the same stacked K x B x D
    (built on first use); ``heads``/``owner``: head parameters, each with its own task's gradient and the index of
    that task.
    """

    losses: Tensor
    zs: list[Tensor]
    z_rows: list[Rows | Factored]
    heads: list[torch.nn.Parameter]
    head_grads: list[Tensor]
    owner: list[int]

    @property
    def z_blocks(self) -> list[Tensor]:
        """The per-task feature gradients stacked, K x B x D per source."""
        return [r.stack() for r in self.z_rows]


def feature_task_grads(losses: Sequence[Tensor], zs: Sequence[Tensor], features: Sequence[Tensor],
                       reads: Sequence[Sequence[int]], heads: Sequence[Sequence[torch.nn.Parameter]],
                       into: Sequence[int] | None = None) -> TaskGrads:
    """Per-task gradients from given features: ``features[j]`` is read by the tasks whose ``reads`` name j and
    lands in the block of ``zs[into[j]]`` (the tensor the aggregated direction is pushed into); ``heads[k]`` are
    task k's own parameters. Shared by the engine's forward and :class:`polytask.JointStep`."""
    blocks, head_grads = feature_rows(losses, features, reads, heads, into)
    owner = [k for k, h in enumerate(heads) for _ in h]
    return TaskGrads(torch.stack(list(losses)), list(zs), blocks, [p for h in heads for p in h],
                     [g for hg in head_grads for g in hg], owner)


def loss_task_grads(losses: Tensor, shared: Sequence[torch.nn.Parameter],
                    heads: Sequence[Sequence[torch.nn.Parameter]], chunk: int) -> tuple[TaskGrads, list[Tensor]]:
    """Per-task gradients of the K-vector ``losses`` straight from the losses (no features): the shared blocks
    (K x P, one per parameter) and every head's own row, from one batched vector-Jacobian product."""
    flat_heads = [p for h in heads for p in h]
    owner = [k for k, h in enumerate(heads) for _ in h]
    grads = batched_grads(losses, list(shared) + flat_heads, chunk)
    head_grads = [g[k] for g, k in zip(grads[len(shared):], owner, strict=True)]
    return TaskGrads(losses, [], [], flat_heads, head_grads, owner), list(grads[:len(shared)])


def _model_heads(model: MultiTaskModel, tasks: Sequence[Task]) -> list[list[torch.nn.Parameter]]:
    return [list(model.task_parameters(t.name)) for t in tasks]


def shared_features(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                    cast: Cast = nullcontext) -> list[list[Tensor]] | None:
    """Every source's shared features of its rows (graph attached), in at least float32; None when the architecture
    has no shared features."""
    out = []
    for src, r in zip(sources, rows, strict=True):
        with cast():
            fs = model.features(src.x[r])
        if fs is None:
            return None
        out.append([full(f) for f in fs])
    return out


def representation_grads(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                         tasks: Sequence[Task], cast: Cast = nullcontext) -> TaskGrads | None:
    """All per-task gradients with respect to the shared features, and every head's own gradient, from ONE backward
    pass; None when the architecture has no shared features.

    Each task's output reads its own leaf copies of the features it reads (``model.reads``), so the backward of
    Σ_k L_k leaves ∂L_k/∂f in task k's copies: no K separate passes and no vmap. The blocks are one per (source,
    feature), in the order of ``tg.zs``. ``cast``: the forward's precision context."""
    per_source = shared_features(model, sources, rows, cast)
    if per_source is None:
        return None
    heads = _linear_heads(model, sources, tasks, per_source, cast)
    if heads is not None:
        return _factored_grads(model, sources[0], rows[0], per_source[0][0], tasks, heads)
    zs = [f for fs in per_source for f in fs]
    copies: list[Tensor] = []
    into: list[int] = []
    reads: dict[str, list[int]] = {}
    losses: dict[str, Tensor] = {}
    base = 0
    for src, r, fs in zip(sources, rows, per_source, strict=True):
        read_here: set[int] = set()
        for t in tasks:
            if t.name not in src.y:
                continue
            wanted = model.reads(t.name)
            mine = [f.detach() for f in fs]
            reads[t.name] = []
            for j in range(len(fs)) if wanted is None else wanted:
                mine[j].requires_grad_()
                reads[t.name].append(len(copies))
                copies.append(mine[j])
                into.append(base + j)
                read_here.add(j)
            with cast():
                losses[t.name] = full(task_loss(t, src, r, model.outputs(mine, [t.name])[t.name]))
        for j in sorted(set(range(len(fs))) - read_here):  # a feature no task reads: a zero block
            copies.append(fs[j].detach())
            into.append(base + j)
        base += len(fs)
    names = [t.name for t in tasks]
    return feature_task_grads([losses[n] for n in names], zs, copies, [reads[n] for n in names],
                              _model_heads(model, tasks), into)


def _linear_heads(model: MultiTaskModel, sources: Sequence[TaskData], tasks: Sequence[Task],
                  per_source: list[list[Tensor]], cast: Cast) -> list[torch.nn.Linear] | None:
    """Every task's linear head when the per-task feature gradients can be kept in factors: one source labelled for
    every task, one feature, each task's output a trainable ``nn.Linear`` of it, full precision (under bf16 autocast
    the dense gradients are the ones the forward's dtypes give); else None."""
    if cast is not nullcontext or len(sources) != 1 or len(per_source[0]) != 1:
        return None
    heads = []
    for t in tasks:
        head = model.linear_head(t.name) if t.name in sources[0].y and model.reads(t.name) in (None, [0], (0,)) \
            else None
        if head is None or not all(p.requires_grad for p in head.parameters()):
            return None
        heads.append(head)
    return heads


def _factored_grads(model: MultiTaskModel, src: TaskData, r: Tensor, z: Tensor, tasks: Sequence[Task],
                    heads: Sequence[torch.nn.Linear]) -> TaskGrads:
    """:func:`representation_grads` for linear heads: one backward pass to the heads' outputs and parameters (none
    through the heads to the feature); task k's feature gradient is kept as (dL_k/d output_k, W_k)
    (:class:`polytask.jacobian.Factored`): the same rows, never formed unless a method reads them."""
    fixed = z.detach()
    preds, losses = [], []
    for t in tasks:
        preds.append(model.outputs([fixed], [t.name])[t.name])
        losses.append(full(task_loss(t, src, r, preds[-1])))
    own = _model_heads(model, tasks)
    params = [p for h in own for p in h]
    total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    grads = torch.autograd.grad(total, preds + params, allow_unused=True, materialize_grads=True)
    block = Factored(tuple(grads[:len(preds)]), tuple(h.weight.detach() for h in heads))
    return TaskGrads(torch.stack(losses), [z], [block], params, list(grads[len(preds):]),
                     [k for k, h in enumerate(own) for _ in h])


def parameter_grads(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                    tasks: Sequence[Task], loss_fn: LossFn, chunk: int, cast: Cast = nullcontext
                    ) -> tuple[TaskGrads, list[Tensor]]:
    """Per-task gradients of the shared parameters (K x P, as blocks per parameter) and of the heads.

    With shared features the K rows are one batched vector-Jacobian product through the part below them, seeded by
    the per-task feature gradients; otherwise through the whole model."""
    shared = list(model.shared_parameters())
    tg = representation_grads(model, sources, rows, tasks, cast)
    if tg is not None:
        return tg, through(tg.zs, shared, tg.z_blocks, chunk) if shared else []
    losses = _cast_losses(loss_fn, cast)(model, sources, rows, tasks)
    return loss_task_grads(losses, shared, _model_heads(model, tasks), chunk)


def _fmtl(loss_fn: Callable[[], Tensor], shared: Sequence[torch.nn.Parameter], blocks: Sequence[Tensor],
          tg: TaskGrads, rho: float) -> tuple[list[Tensor], list[Tensor]]:
    """F-MTL (Phan et al. 2022, task-based flat regions): per-task SAM. For each task k, move the shared
    parameters and task k's head by ρ g_k/||g_k|| and take task k's gradient there. Returns the shared
    "flat" gradients h_k = g_k^SAM - g_k (aggregated separately, as in the paper) and the heads' SAM
    gradients."""
    flat_blocks = [torch.zeros_like(b) for b in blocks]
    head_grads = list(tg.head_grads)
    for k in range(blocks[0].shape[0]):
        mine = [i for i, o in enumerate(tg.owner) if o == k]
        params = list(shared) + [tg.heads[i] for i in mine]
        own = [b[k] for b in blocks] + [tg.head_grads[i] for i in mine]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in own))
        if norm == 0:
            continue
        eps = [(rho * g / norm).reshape(p.shape).to(p.dtype) for g, p in zip(own, params, strict=True)]
        with torch.no_grad():
            torch._foreach_add_(params, eps)
        grads = torch.autograd.grad(loss_fn()[k], params, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        for i in range(len(shared)):
            flat_blocks[i][k] = grads[i].reshape(blocks[i].shape[1:]) - blocks[i][k]
        for j, i in enumerate(mine):
            head_grads[i] = grads[len(shared) + j]
    return flat_blocks, head_grads


def weighted_backward(method: Method, state: State, losses: Tensor,
                      ctx: StepContext | None) -> tuple[Tensor, State]:
    """A loss weighting's step: K weights from the detached losses, then one backward of Σ w_k L_k (gradients
    added into ``.grad``). Returns (weights, new state)."""
    weights, state = _weights(method, state, losses, ctx)
    # the gradient of Σ_k w_k L_k is w: seed the backward with it (no dot node; the same gradients bit for bit)
    losses.backward(weights.to(losses.dtype))
    return weights, state


def aggregated_backward(method: Method, state: State, tg: TaskGrads, blocks: Sequence[Tensor] | None,
                        shared: Sequence[torch.nn.Parameter], ctx: StepContext,
                        closure: Callable[[], Tensor] | None = None,
                        below: Sequence[torch.nn.Parameter] | None = None,
                        push: Callable[[list[Tensor]], None] | None = None,
                        comm: Collective | None = None) -> tuple[Tensor | None, State]:
    """A gradient aggregator's step from per-task gradients: the aggregated direction into the shared part, each
    head's own gradient (scaled by its task weight where the method says so) into the heads; gradients are added
    into ``.grad``. ``representation`` mode aggregates ``tg.z_blocks`` and pushes the direction back from
    ``tg.zs`` (into ``below`` only, when given); ``params`` mode aggregates ``blocks`` (K x parameter shape, one
    per ``shared`` parameter). F-MTL (``sam_rho``) recomputes the K losses with ``closure``. ``push`` (representation
    mode) replaces the backward from ``tg.zs``: it gets the aggregated directions (gradient accumulation recomputes
    the representations). ``comm``: representation mode in data-parallel training (``tg.z_blocks`` hold this rank's
    rows; :func:`_aggregate`). Returns (K weights or None for per-coordinate methods, new state)."""
    ctx = _with_losses(ctx, tg.losses)
    head_grads = tg.head_grads
    if method.mode == "representation":
        directions, weights, state = _aggregate(method, state, tg.z_rows, ctx, comm)
        if push is not None:
            push(directions)
        elif any(z.requires_grad for z in tg.zs):  # else the features of a frozen encoder: nothing below trains
            torch.autograd.backward(tg.zs, directions, inputs=list(below) if below else None)
    else:
        if blocks is None:
            raise ValueError("params mode needs the per-task blocks of the shared parameters")
        if not blocks:  # no shared parameter trains (a frozen encoder): each head takes its own task's gradient
            directions, weights = [], None
        elif method.sam_rho:
            if closure is None:
                raise ConfigError(f"method {method.name!r} with sam_rho (F-MTL) recomputes the task losses at "
                                  "perturbed parameters: pass closure= (a function returning the K losses)")
            directions, weights, main = _aggregate(method, state["main"], blocks, ctx)
            flat_blocks, head_grads = _fmtl(closure, shared, blocks, tg, method.sam_rho)
            flat_dirs, _, flat_state = _aggregate(method, state["flat"], flat_blocks, ctx)
            directions = [d + f for d, f in zip(directions, flat_dirs, strict=True)]
            state = {"main": main, "flat": flat_state}
        else:
            directions, weights, state = _aggregate(method, state, blocks, ctx)
        _set_grads(shared, directions)
    if method.weights_heads and weights is not None:
        head_grads = [g * float(weights[k]) for g, k in zip(head_grads, tg.owner, strict=True)]
    _set_grads(tg.heads, head_grads)
    return weights, state


def train_step(model: MultiTaskModel, method: Method, state: State, sources: Sequence[TaskData],
               rows: Sequence[Tensor], tasks: Sequence[Task], opt: torch.optim.Optimizer, ctx: StepContext | None,
               loss_fn: LossFn, extra: Callable[[], Tensor | None] | None = None, precision: str = "fp32",
               before_update: Callable[[], None] | None = None) -> tuple[Tensor, Tensor | None, State]:
    """Run one step; returns (K losses, K weights or None for per-coordinate methods, new state).

    ``extra()`` (hooks' loss terms): its gradient is added to the gradients the method set, before the update;
    ``before_update()`` then runs with every gradient in ``.grad`` (hooks that change gradients, e.g. A-GEM).
    ``precision``: ``fp32`` or ``bf16`` (the forward under autocast; see the module docstring). ``ctx``: the step's
    context, None for a method with fixed weights (which reads none)."""
    cast = autocast(precision, _device_of(model)) if precision != "fp32" else nullcontext  # no device lookup a step
    if cast is not nullcontext:
        loss_fn = _cast_losses(loss_fn, cast)
    zero_grad(opt)
    if method.kind == "weighting":
        one = _single_loss(model, sources, rows, tasks) if method.unit and loss_fn is task_losses else None
        if one is not None:  # Σ_k w_k L_k with one task weighted 1: its loss itself (the same gradients, fewer nodes)
            one.backward()
            _update(opt, model, extra, before_update)
            return one.detach().reshape(1), method.impl.fixed, state  # unit: no after_step; fixed weights: no graph
        else:
            losses = loss_fn(model, sources, rows, tasks)
            weights, state = weighted_backward(method, state, losses, ctx)
        _update(opt, model, extra, before_update)
        if method.impl.after_step is not None:
            with torch.no_grad():
                new = loss_fn(model, sources, rows, tasks)
            state = method.impl.after_step(state, new, ctx)
        return losses.detach(), weights.detach(), state

    shared = list(model.shared_parameters())
    if method.mode == "representation":
        tg, blocks = _need_features(representation_grads(model, sources, rows, tasks, cast), model), None
    else:
        tg, blocks = parameter_grads(model, sources, rows, tasks, loss_fn, method.chunk, cast)
    weights, state = aggregated_backward(method, state, tg, blocks, shared, ctx,
                                         lambda: loss_fn(model, sources, rows, tasks))
    _update(opt, model, extra, before_update)
    return tg.losses.detach(), None if weights is None else weights.detach().float(), state


def _need_features(tg: TaskGrads | None, model: MultiTaskModel) -> TaskGrads:
    if tg is None:
        raise ConfigError(f"grad_mode representation needs an architecture with shared features; "
                          f"{type(model).__name__} has none (use grad_mode: params)")
    return tg


def _update(opt: torch.optim.Optimizer, model: MultiTaskModel, extra: Callable[[], Tensor | None] | None,
            before_update: Callable[[], None] | None) -> None:
    """The end of every step: the architecture's auxiliary loss and the hooks' extra loss terms backward (added
    to the method's gradients, outside the weighting or aggregation), the hooks' gradient changes, the optimiser."""
    aux, more = model.aux_loss(), extra() if extra is not None else None
    if aux is not None or more is not None:
        (more if aux is None else aux if more is None else torch.stack([aux, more]).sum()).backward()
    if before_update is not None:
        before_update()
    opt.step()


def _with_losses(ctx: StepContext | None, losses: Tensor) -> StepContext:
    if ctx is None:
        raise TypeError("this method reads the step's context: pass a StepContext")
    return replace(ctx, losses=losses.detach())


def _weights(method: Method, state: State, losses: Tensor, ctx: StepContext | None) -> tuple[Tensor, State]:
    """A weighting's K weights for ``losses`` and its new state; fixed weights (``Weighting.fixed``) are read with
    no call, so their steps need no context (``ctx`` None)."""
    fixed = method.impl.fixed
    if fixed is not None:
        return fixed.to(losses.device, losses.dtype), state
    return method.impl.update(state, losses.detach(), _with_losses(ctx, losses))


def task_losses(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                tasks: Sequence[Task]) -> Tensor:
    """The K per-task mean losses of one step, each over the rows labelled for that task (the engine's loss function
    unless a job brings its own)."""
    one = _single_loss(model, sources, rows, tasks)
    if one is not None:  # one node fewer to build and to run backward through than a stack
        return one.unsqueeze(0)
    out: dict[str, Tensor] = {}
    for src, r in zip(sources, rows, strict=True):
        names = [t.name for t in tasks if t.name in src.y]
        preds = model(src.x[r], names)
        for t in tasks:
            if t.name in src.y:
                out[t.name] = task_loss(t, src, r, preds[t.name])
    return torch.stack([out[t.name] for t in tasks])


def _single_loss(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                 tasks: Sequence[Task]) -> Tensor | None:
    """The loss of the one task of a step on one source labelled for it (a scalar), else None."""
    if len(tasks) != 1 or len(sources) != 1 or tasks[0].name not in sources[0].y:
        return None
    task, src, r = tasks[0], sources[0], rows[0]
    return task_loss(task, src, r, model(src.x[r], [task.name])[task.name])


def task_loss(task: Task, src: TaskData, rows: Tensor, pred: Tensor) -> Tensor:
    """``task``'s mean loss on rows ``rows`` of ``src`` from its predictions ``pred`` of them: one fused loss when the
    source is labelled everywhere for the task, else over the labelled rows (:func:`masked_loss`)."""
    if src.complete(task.name) and rows.shape[0]:  # not len(): Tensor.__len__ is a Python call
        return task.mean_loss(pred, src.labels(task)[rows])
    return masked_loss(task, pred, src.y[task.name][rows])


def masked_loss(task: Task, pred: Tensor, y: Tensor) -> Tensor:
    """Mean loss over the labelled rows; a batch with no label gives a zero that still has a graph."""
    m = Task.mask(y)
    if bool(m.all()) and len(m):
        return task.mean_loss(pred, y)
    return task.mean_loss(pred[m], y[m]) if m.any() else pred.sum() * 0.0


def task_fractions(micro: Sequence[tuple[Sequence[TaskData], Sequence[Tensor]]], tasks: Sequence[Task]) -> Tensor:
    """N x K (float64): the share of task k's labelled rows of the effective batch that micro-batch m holds, so
    that Σ_m f_mk L_mk is the effective batch's mean loss (zero where a task has no label in the batch)."""
    counts = label_counts(micro, tasks)
    return counts / counts.sum(0).clamp_min(1.0)


def label_counts(micro: Sequence[tuple[Sequence[TaskData], Sequence[Tensor]]], tasks: Sequence[Task]) -> Tensor:
    """N x K (float64): how many rows of micro-batch m are labelled for task k."""
    counts = torch.zeros(len(micro), len(tasks), dtype=torch.float64)
    for m, (sources, rows) in enumerate(micro):
        for src, r in zip(sources, rows, strict=True):
            for k, t in enumerate(tasks):
                if t.name in src.y:
                    counts[m, k] += float(Task.mask(src.y[t.name][r]).sum())
    return counts


def _rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _scaled(g: Tensor, f: Tensor) -> Tensor:
    """Row k of the K x ... block ``g`` times f[k]."""
    return g * f.to(g.device, g.dtype).reshape(-1, *([1] * (g.dim() - 1)))


def _scaled_block(b: Rows | Factored, f: Tensor) -> Block:
    """Row k of a feature-gradient block times f[k]: a factored block stays factored (its output gradients scaled)."""
    if isinstance(b, Factored) and b._stacked is None:
        return Factored(tuple(d * f[k].to(d.device, d.dtype) for k, d in enumerate(b.deltas)), b.maps)
    return _scaled(dense(b), f)


def _joined_rows(parts: Sequence[Block]) -> Rows | Factored:
    """The feature-gradient blocks of the micro-batches as one block over all their rows (the effective batch's)."""
    factored = [p for p in parts if isinstance(p, Factored)]
    if len(factored) == len(parts):
        return Factored(tuple(torch.cat(d) for d in zip(*(p.deltas for p in factored), strict=True)),
                        factored[0].maps)
    return Rows.of(torch.cat([dense(p) for p in parts], dim=1))


def _add(total: list[Tensor] | None, part: Sequence[Tensor]) -> list[Tensor]:
    return list(part) if total is None else [a + b for a, b in zip(total, part, strict=True)]


def accumulated_step(model: MultiTaskModel, method: Method, state: State,
                     micro: Sequence[tuple[Sequence[TaskData], Sequence[Tensor]]], tasks: Sequence[Task],
                     opt: torch.optim.Optimizer, ctx: StepContext | None, loss_fn: LossFn,
                     extra: Callable[[], Tensor | None] | None = None, precision: str = "fp32",
                     before_update: Callable[[], None] | None = None,
                     comm: Collective | None = None) -> tuple[Tensor, Tensor | None, State]:
    """One optimiser step over the micro-batches ``micro`` (each ``(sources, rows)``), the method seeing the
    effective batch (module docstring); one micro-batch is :func:`train_step`. Returns what it returns, the losses
    being the effective batch's. ``faults.hit("micro")`` counts each micro-batch done (the kill-and-resume tests
    stop a run between two of them).

    ``comm``: data-parallel training (:mod:`polytask.engine.distributed`): ``micro`` is the global step's
    micro-batches, this rank trains on its share of each, and the per-task quantities are summed across ranks before
    the method sees them, so every rank takes the same step."""
    if comm is None and len(micro) == 1:
        return train_step(model, method, state, micro[0][0], micro[0][1], tasks, opt, ctx, loss_fn, extra, precision,
                          before_update)
    if method.sam_rho:
        if comm is not None:
            check_method(method.name, method.sam_rho)
        raise ConfigError(f"method {method.name!r}: F-MTL (sam_rho) cannot accumulate gradients over micro-batches "
                          "(it recomputes the whole batch's losses at perturbed parameters); use train.accumulate: 1")
    device = _device_of(model)
    cast = autocast(precision, device)
    loss_fn = _cast_losses(loss_fn, cast)
    if comm is None:
        frac = task_fractions(micro, tasks)
    else:  # rank r's share of each task's labelled rows of the global batch: Σ_r Σ_m f_rmk L_rmk is its mean loss
        total = label_counts(micro, tasks).sum(0).clamp_min(1.0)
        micro = [shard(m, comm) for m in micro]
        frac = label_counts(micro, tasks) / total
    zero_grad(opt)

    if method.kind == "weighting":
        rngs, losses, graphs = [], None, None
        if comm is not None and len(micro) == 1:  # the weights need the global losses: keep this one graph
            graphs = [_scaled(loss_fn(model, micro[0][0], micro[0][1], tasks), frac[0])]
            losses = graphs[0].detach()
        else:
            with torch.no_grad():
                for m, (sources, rows) in enumerate(micro):
                    rngs.append(_rng(device))
                    part = _scaled(loss_fn(model, sources, rows, tasks), frac[m])
                    losses = part if losses is None else losses + part
        assert losses is not None
        if comm is not None:
            (losses,) = comm.sum([losses])
        weights, state = _weights(method, state, losses, ctx)
        for m, (sources, rows) in enumerate(micro):
            if graphs is None:
                _set_rng(rngs[m], device)
            part = graphs[m] if graphs is not None else _scaled(loss_fn(model, sources, rows, tasks), frac[m])
            (weights * part).sum().backward()
            faults.hit("micro")
        if comm is not None:
            comm.sum_grads(list(model.parameters()))
        _update(opt, model, extra, before_update)
        if method.impl.after_step is not None:
            with torch.no_grad():
                new = sum(_scaled(loss_fn(model, s, r, tasks), frac[m]) for m, (s, r) in enumerate(micro))
            if comm is not None:
                (new,) = comm.sum([new])
            state = method.impl.after_step(state, new, ctx)
        return losses.detach(), weights.detach(), state

    shared = list(model.shared_parameters())
    heads = _model_heads(model, tasks)
    owner = [k for k, h in enumerate(heads) for _ in h]
    total_losses: Tensor | None = None
    head_grads: list[Tensor] | None = None
    blocks: list[Tensor] | None = None
    z_parts: list[list[Block]] = []
    rngs = []
    representation = method.mode == "representation"
    kept: list[Tensor] = []  # one micro-batch (data-parallel): push from its representation, no recomputation
    for m, (sources, rows) in enumerate(micro):
        f = frac[m]
        if representation:
            rngs.append(_rng(device))
            tg = _need_features(representation_grads(model, sources, rows, tasks, cast), model)
            z_parts.append([_scaled_block(b, f) for b in tg.z_rows])
            if len(micro) == 1:
                kept = tg.zs
        else:
            tg, part = parameter_grads(model, sources, rows, tasks, loss_fn, method.chunk, cast)
            blocks = _add(blocks, [_scaled(b, f) for b in part])
        part_losses = _scaled(tg.losses.detach(), f)
        total_losses = part_losses if total_losses is None else total_losses + part_losses
        head_grads = _add(head_grads, [g * float(f[k]) for g, k in zip(tg.head_grads, owner, strict=True)])
        del tg
        faults.hit("micro")
    assert total_losses is not None and head_grads is not None
    if comm is not None:  # J = Σ_r J_r: sum the Jacobian (params mode), never the aggregated directions
        summed = comm.sum([total_losses, *head_grads, *(blocks or [])])
        total_losses, head_grads, blocks = summed[0], summed[1:1 + len(head_grads)], \
            summed[1 + len(head_grads):] if blocks is not None else None
    effective = TaskGrads(total_losses, kept, [_joined_rows(col) for col in zip(*z_parts, strict=True)]
                          if representation else [], [p for h in heads for p in h], head_grads, owner)

    def push(directions: list[Tensor]) -> None:
        """Recompute each micro-batch's representation (same RNG draws) and push its rows of the direction."""
        start = [0] * len(directions)
        for m, (sources, rows) in enumerate(micro):
            _set_rng(rngs[m], device)
            zs = [f for fs in shared_features(model, sources, rows, cast) or [] for f in fs]
            parts = [d[s0:s0 + len(z)] for d, s0, z in zip(directions, start, zs, strict=True)]
            start = [s0 + len(z) for s0, z in zip(start, zs, strict=True)]
            if any(z.requires_grad for z in zs):  # else the features of a frozen encoder
                torch.autograd.backward(zs, parts)

    weights, state = aggregated_backward(method, state, effective, blocks, shared, ctx,
                                         push=push if representation and not kept else None,
                                         comm=comm if representation else None)
    if comm is not None and representation:  # each rank pushed its own rows' direction through the encoder
        comm.sum_grads(shared)
    _update(opt, model, extra, before_update)
    return total_losses, None if weights is None else weights.detach().float(), state
