"""Per-task gradients, the expensive part of gradient aggregation.

``params`` mode: the exact K x P Jacobian of the shared parameters from one batched vector-Jacobian
product (``is_grads_batched``: the K backward passes are vectorised, not looped in Python), optionally
in chunks of tasks to bound memory. ``representation`` mode: the per-sample gradients of each task loss
with respect to the shared representation (K x B x D), far cheaper since only the heads are differentiated
K times; the encoder then takes a single backward pass with the aggregated representation gradient.
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


def flat(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate (K, ...) gradient blocks into one K x P matrix."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def gramian(blocks: Sequence[Tensor]) -> Tensor:
    """G = J J^T in float64, summed over blocks of J's columns (no K x P concatenation).

    Every block is multiplied in float64, whatever the gradients' dtype: on nearly dependent gradients the
    small eigenvalues of G, which decide MGDA, IMTL-G, Nash-MTL, ConFIG and the dual-cone projections, are
    below float32's rounding of the large ones (a float32 product gave cosines 0.6-0.95 to the exact
    direction, and ConFIG a zero update). On the CPU the upcast goes by cache-sized chunks of columns
    (~64K values), which makes it 2-3x cheaper than upcasting a whole block; elsewhere one block at a time."""
    k = blocks[0].shape[0]
    out = torch.zeros(k, k, dtype=torch.float64, device=blocks[0].device)
    step = max(2048, 65536 // max(k, 1))
    for b in blocks:
        m = b.reshape(k, -1)
        if m.device.type != "cpu" or m.dtype == torch.float64:
            m = m.to(torch.float64)
            out += m @ m.T
            continue
        for start in range(0, m.shape[1], step):
            c = m[:, start:start + step].to(torch.float64)
            out += c @ c.T
    return out


def combine(weights: Tensor, blocks: Sequence[Tensor]) -> list[Tensor]:
    """Σ_k w_k J_k for each block (the update direction J^T w, block by block)."""
    return [torch.tensordot(weights.to(b.device, b.dtype), b, dims=1) for b in blocks]


def split(direction: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Cut a flat P-vector back into blocks shaped like ``like[i].shape[1:]``."""
    sizes = [b[0].numel() for b in like]
    return [d.reshape(b.shape[1:]).to(b.device) for d, b in zip(direction.split(sizes), like, strict=True)]
