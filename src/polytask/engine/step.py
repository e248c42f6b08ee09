"""One optimisation step for any method: loss weightings and gradient aggregators.

A weighting turns the K losses into K weights and the step minimises Σ w_k L_k. An aggregator receives
the per-task gradients (their Gramian, or the Jacobian itself) from :mod:`polytask.jacobian`, in
``params`` mode (shared parameters) or ``representation`` mode (shared representation, per sample), and
the step sets the shared gradient to the aggregated direction. Head (task-specific) parameters get their
own task's gradient, scaled by the task weight only where the method says so (``weights_heads``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from polytask.config import MethodConfig
from polytask.errors import ConfigError
from polytask.jacobian import batched_grads, combine, flat, gramian, split
from polytask.methods import load_all
from polytask.models import MultiTaskModel
from polytask.tasks.task import Task, TaskData
from polytask.weighting.base import State, StepContext

LossFn = Callable[[MultiTaskModel, Sequence[TaskData], Sequence[Tensor], Sequence[Task]], Tensor]


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

    def init(self) -> State:
        if self.sam_rho:  # F-MTL aggregates the loss and the flat gradients separately
            return {"main": self.impl.init(), "flat": self.impl.init()}
        return self.impl.init()


def build_method(cfg: MethodConfig, task_names: Sequence[str]) -> Method:
    registry = load_all()
    entry = registry.get(cfg.name)
    kind = entry.extra.get("kind", "weighting")
    impl = registry.build(cfg.name, cfg.params, list(task_names), where=f"methods.{cfg.label}.params")
    method = Method(cfg.name, kind, impl, bool(entry.extra.get("weights_heads")), bool(entry.extra.get("needs_val")),
                    cfg.grad_mode, cfg.chunk_size, cfg.sam_rho)
    if kind == "weighting" and cfg.sam_rho:
        raise ConfigError(f"methods.{cfg.label}.sam_rho: F-MTL needs a gradient aggregator (e.g. mean), "
                          f"not the loss weighting {cfg.name!r}")
    if cfg.sam_rho and cfg.grad_mode != "params":
        raise ConfigError(f"methods.{cfg.label}.sam_rho: F-MTL perturbs parameters; use grad_mode: params")
    return method


def _set_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.detach().reshape(p.shape).to(p.dtype)


def _aggregate(method: Method, state: State, blocks: Sequence[Tensor], ctx: StepContext
               ) -> tuple[list[Tensor], Tensor | None, State]:
    """Aggregate per-task gradient blocks (each K x ...) into one direction per block."""
    agg = method.impl
    if agg.input == "gramian":  # float64 Gramian of the blocks; the update J^T w in the gradients' dtype
        weights, state = agg.update(state, gramian(blocks), replace(ctx, grad_dtype=blocks[0].dtype))
        return combine(weights, blocks), weights, state
    direction, state = agg.update(state, flat(blocks), ctx)
    return split(direction, blocks), None, state


@dataclass
class TaskGrads:
    """Per-task gradients of one batch.

    ``zs``: the shared representations (graph attached), one per source; ``z_blocks``: K x B x D per source,
    row k the per-sample gradient of task k's loss; ``heads``/``owner``: head parameters, each with its own
    task's gradient and the index of that task.
    """

    losses: Tensor
    zs: list[Tensor]
    z_blocks: list[Tensor]
    heads: list[torch.nn.Parameter]
    head_grads: list[Tensor]
    owner: list[int]


def representation_grads(model: Any, sources: Sequence[TaskData], rows: Sequence[Tensor],
                         tasks: Sequence[Task]) -> TaskGrads:
    """All per-task representation gradients and every head's own gradient from ONE backward pass.

    Each head reads its own leaf copy of the representation, so the backward of Σ_k L_k leaves
    ∂L_k/∂z in copy k: no K separate passes and no vmap."""
    zs, copies, losses = [], {}, {}
    for src, r in zip(sources, rows, strict=True):
        z = model.encode(src.x[r])
        zs.append(z)
        for t in tasks:
            if t.name in src.y:
                copies[t.name] = z.detach().requires_grad_()
                pred = model.decode(copies[t.name], [t.name])[t.name]
                losses[t.name] = masked_loss(t, pred, src.y[t.name][r])
    loss_vec = torch.stack([losses[t.name] for t in tasks])
    heads, owner = [], []
    for k, t in enumerate(tasks):
        group = list(model.task_parameters(t.name))
        heads += group
        owner += [k] * len(group)
    names = [t.name for t in tasks]
    grads = torch.autograd.grad(loss_vec.sum(), [copies[n] for n in names] + heads, allow_unused=True,
                                materialize_grads=True)
    z_blocks = []
    for z in zs:
        rows_k = [g if copies[n].data_ptr() == z.data_ptr() else torch.zeros_like(z)
                  for n, g in zip(names, grads[:len(names)], strict=True)]
        z_blocks.append(torch.stack(rows_k))
    return TaskGrads(loss_vec, zs, z_blocks, heads, list(grads[len(names):]), owner)


def parameter_grads(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
                    tasks: Sequence[Task], loss_fn: LossFn, chunk: int) -> tuple[TaskGrads, list[Tensor]]:
    """Per-task gradients of the shared parameters (K x P, as blocks per parameter) and of the heads.

    With a single shared representation the K rows are one batched vector-Jacobian product through the
    encoder, seeded by the per-task representation gradients; otherwise through the whole model."""
    shared = list(model.shared_parameters())
    if hasattr(model, "encode") and hasattr(model, "decode"):
        tg = representation_grads(model, sources, rows, tasks)
        k = len(tasks)
        step = chunk if chunk > 0 else k
        parts = [torch.autograd.grad(tg.zs, shared, grad_outputs=[b[i:i + step] for b in tg.z_blocks],
                                     is_grads_batched=True, retain_graph=i + step < k, allow_unused=True,
                                     materialize_grads=True) for i in range(0, k, step)]
        blocks = list(parts[0]) if len(parts) == 1 else [torch.cat(col) for col in zip(*parts, strict=True)]
        return tg, blocks
    losses = loss_fn(model, sources, rows, tasks)
    heads, owner = [], []
    for k, t in enumerate(tasks):
        group = list(model.task_parameters(t.name))
        heads += group
        owner += [k] * len(group)
    grads = batched_grads(losses, shared + heads, chunk)
    head_grads = [g[k] for g, k in zip(grads[len(shared):], owner, strict=True)]
    return TaskGrads(losses, [], [], heads, head_grads, owner), list(grads[:len(shared)])


def _fmtl(model: MultiTaskModel, loss_fn: Callable[[], Tensor], shared: Sequence[torch.nn.Parameter],
          blocks: Sequence[Tensor], tg: TaskGrads, rho: float) -> tuple[list[Tensor], list[Tensor]]:
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


def train_step(model: MultiTaskModel, method: Method, state: State, sources: Sequence[TaskData],
               rows: Sequence[Tensor], tasks: Sequence[Task], opt: torch.optim.Optimizer, ctx: StepContext,
               loss_fn: LossFn) -> tuple[Tensor, Tensor | None, State]:
    """Run one step; returns (K losses, K weights or None for per-coordinate methods, new state)."""
    opt.zero_grad(set_to_none=True)
    if method.kind == "weighting":
        losses = loss_fn(model, sources, rows, tasks)
        weights, state = method.impl.update(state, losses.detach(), _with_losses(ctx, losses))
        (weights * losses).sum().backward()
        opt.step()
        if method.impl.after_step is not None:
            with torch.no_grad():
                new = loss_fn(model, sources, rows, tasks)
            state = method.impl.after_step(state, new, ctx)
        return losses.detach(), weights.detach(), state

    if method.mode == "representation":
        if not hasattr(model, "encode"):
            raise ConfigError(f"grad_mode representation needs an architecture with one shared representation; "
                              f"{type(model).__name__} has none (use grad_mode: params)")
        tg = representation_grads(model, sources, rows, tasks)
        ctx = _with_losses(ctx, tg.losses)
        directions, weights, state = _aggregate(method, state, tg.z_blocks, ctx)
        torch.autograd.backward(tg.zs, directions)
        head_grads = tg.head_grads
    else:
        shared = list(model.shared_parameters())
        tg, blocks = parameter_grads(model, sources, rows, tasks, loss_fn, method.chunk)
        ctx = _with_losses(ctx, tg.losses)
        head_grads = tg.head_grads
        if method.sam_rho:
            directions, weights, main = _aggregate(method, state["main"], blocks, ctx)
            flat_blocks, head_grads = _fmtl(model, lambda: loss_fn(model, sources, rows, tasks), shared, blocks,
                                            tg, method.sam_rho)
            flat_dirs, _, flat_state = _aggregate(method, state["flat"], flat_blocks, ctx)
            directions = [d + f for d, f in zip(directions, flat_dirs, strict=True)]
            state = {"main": main, "flat": flat_state}
        else:
            directions, weights, state = _aggregate(method, state, blocks, ctx)
        _set_grads(shared, directions)
    if method.weights_heads and weights is not None:
        head_grads = [g * float(weights[k]) for g, k in zip(head_grads, tg.owner, strict=True)]
    _set_grads(tg.heads, head_grads)
    opt.step()
    return tg.losses.detach(), None if weights is None else weights.detach().float(), state


def _with_losses(ctx: StepContext, losses: Tensor) -> StepContext:
    return replace(ctx, losses=losses.detach())


def masked_loss(task: Task, pred: Tensor, y: Tensor) -> Tensor:
    """Mean loss over the labelled rows; a batch with no label gives a zero that still has a graph."""
    m = Task.mask(y)
    if bool(m.all()):
        return task.loss(pred, y).mean()
    return task.loss(pred[m], y[m]).mean() if m.any() else pred.sum() * 0.0
