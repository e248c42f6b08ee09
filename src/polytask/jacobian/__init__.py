"""Per-task gradients, the expensive part of gradient aggregation.

``params`` mode: the exact K x P Jacobian of the shared parameters from one batched vector-Jacobian
product (``is_grads_batched``: the K backward passes are vectorised, not looped in Python), optionally
in chunks of tasks to bound memory. ``representation`` mode: the per-sample gradients of each task loss
with respect to the shared representation (K x B x D), far cheaper since only the heads are differentiated
K times; the encoder then takes a single backward pass with the aggregated representation gradient.

Every function here works from what it is given (losses, feature tensors, parameter lists), never from a model:
which features each task reads is an argument, so any architecture (one shared tensor, or per-task features)
gets the same per-task gradients (torchjd's ``mtl_backward`` is the model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def batched_grads(losses: Tensor, inputs: Sequence[Tensor], chunk: int = 0) -> list[Tensor]:
    """d losses[k] / d inputs[i] for every k: a list of (K, *inputs[i].shape) tensors.

    Inputs a loss does not depend on get zeros. ``chunk`` > 0 computes at most that many rows at a time.
    The graph is kept, so the caller may differentiate again.
    """
    k = losses.shape[0]
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    step = chunk if chunk > 0 else k
    parts: list[list[Tensor]] = []
    for start in range(0, k, step):
        rows = eye[start:start + step]
        grads = torch.autograd.grad(losses, list(inputs), grad_outputs=rows, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
        parts.append(list(grads))
    return [torch.cat(col) for col in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]


def feature_jacobians(losses: Sequence[Tensor], features: Sequence[Tensor], reads: Sequence[Sequence[int]],
                      heads: Sequence[Sequence[Tensor]], into: Sequence[int] | None = None
                      ) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Per-task gradients of the K scalar ``losses`` with respect to the features each task reads, and each task's
    gradient with respect to its own head parameters.

    ``reads[k]``: indices into ``features`` that task k reads; ``heads[k]``: task k's own parameters. Returns
    ``(blocks, head_grads)``: ``blocks[b]`` is K x (feature shape), row k = dL_k/d(the feature of block b that task
    k reads), zero where task k reads none; features go to block ``into[j]`` (default: one block per feature; the
    features of one block share a shape). ``head_grads[k][i]`` = dL_k/d heads[k][i].

    When every feature is a leaf read by one task only (detached per-task copies of a shared representation, as
    the engine's forward arranges), one backward pass of the summed loss gives everything. Otherwise one pass per
    task, each running only through the part of the graph between that loss and the inputs (so a list of separate
    per-task losses costs one head backward per task; slices of one stacked loss vector cost K each). The graph
    below the features is kept for the caller; a loss without a graph contributes zeros.
    """
    k = len(losses)
    into = list(range(len(features))) if into is None else list(into)
    n_blocks = max(into) + 1 if into else 0
    rows: list[list[Tensor | None]] = [[None] * k for _ in range(n_blocks)]
    readers = [j for r in reads for j in r]
    if len(set(readers)) == len(readers) and all(features[j].is_leaf for j in readers):
        wanted = [features[j] for j in readers] + [p for h in heads for p in h]
        live = [loss for loss in losses if loss.requires_grad]
        grads = list(torch.autograd.grad(torch.stack(live).sum(), wanted, allow_unused=True,
                                         materialize_grads=True)) if live else [torch.zeros_like(w) for w in wanted]
        feats, rest = iter(grads[:len(readers)]), iter(grads[len(readers):])
        per_task = [([next(feats) for _ in reads[t]], [next(rest) for _ in heads[t]]) for t in range(k)]
    else:
        per_task = []
        for t in range(k):
            wanted = [features[j] for j in reads[t]] + list(heads[t])
            g = (torch.autograd.grad(losses[t], wanted, retain_graph=True, allow_unused=True, materialize_grads=True)
                 if losses[t].requires_grad else [torch.zeros_like(w) for w in wanted])
            per_task.append((list(g[:len(reads[t])]), list(g[len(reads[t]):])))
    for t, (fg, _) in enumerate(per_task):
        for j, g in zip(reads[t], fg, strict=True):
            b = into[j]
            rows[b][t] = g if rows[b][t] is None else rows[b][t] + g
    like = [features[into.index(b)] for b in range(n_blocks)]
    blocks = [torch.stack([r if r is not None else torch.zeros_like(z) for r in col]) for col, z in zip(rows, like,
                                                                                                         strict=True)]
    return blocks, [hg for _, hg in per_task]


def through(outputs: Sequence[Tensor], inputs: Sequence[Tensor], blocks: Sequence[Tensor], chunk: int = 0
            ) -> list[Tensor]:
    """Push K row-gradients of ``outputs`` back to ``inputs`` in one batched vector-Jacobian product: for every
    row k, d(sum_o <outputs[o], blocks[o][k]>)/d inputs[i]; a list of (K, *inputs[i].shape) tensors.

    With ``blocks`` the per-task feature gradients this is the exact per-task Jacobian of the parameters below the
    features, K backward passes vectorised; ``chunk`` > 0 does at most that many rows at a time. The graph is
    freed after the last chunk."""
    k = blocks[0].shape[0]
    step = chunk if chunk > 0 else k
    parts = [torch.autograd.grad(list(outputs), list(inputs), grad_outputs=[b[i:i + step] for b in blocks],
                                 is_grads_batched=True, retain_graph=i + step < k, allow_unused=True,
                                 materialize_grads=True) for i in range(0, k, step)]
    return list(parts[0]) if len(parts) == 1 else [torch.cat(col) for col in zip(*parts, strict=True)]


def flat(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate (K, ...) gradient blocks into one K x P matrix."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def gramian(blocks: Sequence[Tensor]) -> Tensor:
    """G = J J^T in float64, summed over blocks of J's columns (no K x P concatenation).

    Every block is multiplied in float64, whatever the gradients' dtype: on nearly dependent gradients the
    small eigenvalues of G, which decide MGDA, IMTL-G, Nash-MTL, ConFIG and the dual-cone projections, are
    below float32's rounding of the large ones (a float32 product gave cosines 0.6-0.95 to the exact
    direction, and ConFIG a zero update). On the CPU the upcast goes by cache-sized chunks of columns
    (~64K values) into one reused buffer, each chunk's product added in place: at K = 10 and 131K columns
    0.77x the time of one chunk-sized temporary per chunk and 0.93x upcasting whole blocks (the upcast, not
    the product, is the cost); elsewhere one block at a time."""
    k = blocks[0].shape[0]
    out = torch.zeros(k, k, dtype=torch.float64, device=blocks[0].device)
    step = max(256, 65536 // max(k, 1))
    work: Tensor | None = None
    for b in blocks:
        m = b.reshape(k, -1)
        if m.device.type != "cpu" or m.dtype == torch.float64:
            m = m.to(torch.float64)
            out.addmm_(m, m.T)
            continue
        if work is None:
            work = torch.empty(k * step, dtype=torch.float64)
        for start in range(0, m.shape[1], step):
            c = m[:, start:start + step]
            w = work[:c.numel()].view(c.shape).copy_(c)
            out.addmm_(w, w.T)
    return out


def combine(weights: Tensor, blocks: Sequence[Tensor]) -> list[Tensor]:
    """Σ_k w_k J_k for each block (the update direction J^T w, block by block)."""
    return [torch.tensordot(weights.to(b.device, b.dtype), b, dims=1) for b in blocks]


def split(direction: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Cut a flat P-vector back into blocks shaped like ``like[i].shape[1:]``."""
    sizes = [b[0].numel() for b in like]
    return [d.reshape(b.shape[1:]).to(b.device) for d, b in zip(direction.split(sizes), like, strict=True)]
