"""One optimisation step for any method: loss weightings and gradient aggregators.

A weighting turns the K losses into K weights and the step minimises Σ w_k L_k. An aggregator receives
the per-task gradients (their Gramian, or the Jacobian itself) from :mod:`polytask.jacobian`, in
``params`` mode (shared parameters) or ``representation`` mode (shared representation, per sample), and
the step sets the shared gradient to the aggregated direction. Head (task-specific) parameters get their
own task's gradient, scaled by the task weight only where the method says so (``weights_heads``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def _head_groups(model: MultiTaskModel, tasks: Sequence[Task]) -> list[list[torch.nn.Parameter]]:
    return [list(model.task_parameters(t.name)) for t in tasks]


def _set_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.detach().reshape(p.shape).to(p.dtype)


def _aggregate(method: Method, state: State, blocks: Sequence[Tensor], ctx: StepContext
               ) -> tuple[list[Tensor], Tensor | None, State]:
    """Aggregate per-task gradient blocks (each K x ...) into one direction per block."""
    agg = method.impl
    if agg.input == "gramian":
        weights, state = agg.update(state, gramian(blocks), ctx)
        return combine(weights, blocks), weights, state
    direction, state = agg.update(state, flat(blocks), ctx)
    return split(direction, blocks), None, state


def _head_grads(method: Method, weights: Tensor | None, head_blocks: Sequence[Tensor],
                groups: Sequence[Sequence[torch.nn.Parameter]]) -> list[Tensor]:
    """Row k of task k's head blocks, scaled by w_k if the method weights the heads."""
    out, i = [], 0
    for k, group in enumerate(groups):
        scale = float(weights[k]) if method.weights_heads and weights is not None else 1.0
        for _ in group:
            out.append(head_blocks[i][k] * scale)
            i += 1
    return out


def _fmtl_flat_blocks(model: MultiTaskModel, loss_fn: Callable[[], Tensor], shared: Sequence[torch.nn.Parameter],
                      shared_blocks: Sequence[Tensor], heads: Sequence[Sequence[torch.nn.Parameter]],
                      head_blocks: Sequence[Tensor], rho: float) -> tuple[list[Tensor], list[Tensor]]:
    """F-MTL (Phan et al. 2022): per-task SAM. For each task k, move the shared parameters and task k's
    head by ρ ĝ_k/||ĝ_k|| and take task k's gradient there. Returns the shared "flat" gradients
    h_k = g_k^SAM - g_k (aggregated separately, as in the paper) and the heads' SAM gradients."""
    k_tasks = shared_blocks[0].shape[0]
    flat_shared = [torch.zeros_like(b) for b in shared_blocks]
    sam_heads = [b.clone() for b in head_blocks]
    offsets = [0]
    for group in heads:
        offsets.append(offsets[-1] + len(group))
    for k in range(k_tasks):
        own = [b[k] for b in shared_blocks] + [head_blocks[i][k] for i in range(offsets[k], offsets[k + 1])]
        params = list(shared) + list(heads[k])
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in own))
        if norm == 0:
            continue
        eps = [rho * g / norm for g in own]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e.reshape(p.shape))
        grads = torch.autograd.grad(loss_fn()[k], params, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e.reshape(p.shape))
        for i in range(len(shared)):
            flat_shared[i][k] = grads[i].reshape(shared_blocks[i].shape[1:]) - shared_blocks[i][k]
        for j, i in enumerate(range(offsets[k], offsets[k + 1])):
            sam_heads[i][k] = grads[len(shared) + j].reshape(head_blocks[i].shape[1:])
    return flat_shared, sam_heads


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

    heads = _head_groups(model, tasks)
    head_params = [p for g in heads for p in g]
    if method.mode == "representation":
        encode = getattr(model, "encode", None)
        if encode is None:
            raise ConfigError(f"grad_mode representation needs an architecture with one shared representation; "
                              f"{type(model).__name__} has none (use grad_mode: params)")
        zs = [encode(src.x[r]) for src, r in zip(sources, rows, strict=True)]
        detached = [z.detach().requires_grad_() for z in zs]
        losses = _losses_from_representation(model, detached, sources, rows, tasks)
        grads = batched_grads(losses, detached + head_params, method.chunk)
        z_blocks, head_blocks = grads[:len(zs)], grads[len(zs):]
        ctx = _with_losses(ctx, losses)
        directions, weights, state = _aggregate(method, state, z_blocks, ctx)
        torch.autograd.backward(zs, directions)
    else:
        shared = list(model.shared_parameters())
        losses = loss_fn(model, sources, rows, tasks)
        grads = batched_grads(losses, shared + head_params, method.chunk)
        shared_blocks, head_blocks = grads[:len(shared)], grads[len(shared):]
        ctx = _with_losses(ctx, losses)
        if method.sam_rho:
            directions, weights, main = _aggregate(method, state["main"], shared_blocks, ctx)
            flat_blocks, head_blocks = _fmtl_flat_blocks(
                model, lambda: loss_fn(model, sources, rows, tasks), shared, shared_blocks, heads, head_blocks,
                method.sam_rho)
            flat_dirs, _, flat_state = _aggregate(method, state["flat"], flat_blocks, ctx)
            directions = [d + f for d, f in zip(directions, flat_dirs, strict=True)]
            state = {"main": main, "flat": flat_state}
        else:
            directions, weights, state = _aggregate(method, state, shared_blocks, ctx)
        _set_grads(shared, directions)
    _set_grads(head_params, _head_grads(method, weights, head_blocks, heads))
    opt.step()
    return losses.detach(), None if weights is None else weights.detach().float(), state


def _with_losses(ctx: StepContext, losses: Tensor) -> StepContext:
    return StepContext(ctx.step, ctx.epoch, losses.detach(), ctx.val_losses, ctx.steps_per_epoch, ctx.generator)


def _losses_from_representation(model: Any, zs: Sequence[Tensor], sources: Sequence[TaskData],
                                rows: Sequence[Tensor], tasks: Sequence[Task]) -> Tensor:
    out: dict[str, Tensor] = {}
    for z, src, r in zip(zs, sources, rows, strict=True):
        names = [t.name for t in tasks if t.name in src.y]
        preds = model.decode(z, names)
        for t in tasks:
            if t.name in names:
                out[t.name] = masked_loss(t, preds[t.name], src.y[t.name][r])
    return torch.stack([out[t.name] for t in tasks])


def masked_loss(task: Task, pred: Tensor, y: Tensor) -> Tensor:
    """Mean loss over the labelled rows; a batch with no label gives a zero that still has a graph."""
    m = Task.mask(y)
    return task.loss(pred[m], y[m]).mean() if m.any() else pred.sum() * 0.0
