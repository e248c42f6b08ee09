"""Per-task gradients, the expensive part of gradient aggregation.

``params`` mode: the exact K x P Jacobian of the shared parameters from one batched vector-Jacobian
product (``is_grads_batched``: the K backward passes are vectorised, not looped in Python), optionally
in chunks of tasks to bound memory. ``representation`` mode: the per-sample gradients of each task loss
with respect to the shared representation (K x B x D), far cheaper since only the heads are differentiated
K times; the encoder then takes a single backward pass with the aggregated representation gradient. Those K
gradients are kept as the K tensors autograd returns (:class:`Rows`): the float64 Gramian (:func:`gramian`) and
the update J^T w (:func:`combine`) read them in place, and only methods that need the K x B x D array stack it.
Where every task reads the representation through a linear head, each gradient is kept in factors instead
(:class:`Factored`: the gradient of the head's output times its weight), from which the Gramian and the update take
two small products and the heads are never differentiated with respect to the representation.

Every function here works from what it is given (losses, feature tensors, parameter lists), never from a model:
which features each task reads is an argument, so any architecture (one shared tensor, or per-task features)
gets the same per-task gradients (torchjd's ``mtl_backward`` is the model).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

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
        parts.append(_rows_of(grads, inputs, len(rows)))
    return [torch.cat(col) for col in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]


def _rows_of(grads: Sequence[Tensor], inputs: Sequence[Tensor], k: int) -> list[Tensor]:
    """Batched gradients as (k, *input shape) each: ``materialize_grads`` gives an input that no output reaches
    zeros of the input's own shape, without the batch dimension (torch 2.13), which a reshape downstream would
    silently misread wherever the size divides by k."""
    return [g if g.dim() == x.dim() + 1 else torch.zeros((k, *x.shape), dtype=g.dtype, device=g.device)
            for g, x in zip(grads, inputs, strict=True)]


@dataclass(eq=False)
class Rows:
    """One block of the K-row per-task Jacobian kept as its K rows, never stacked unless asked.

    ``rows[k]``: task k's gradient with respect to the block's tensor (shape ``row_shape``), None where task k reads
    none of it (a zero row). The engine's representation mode makes the K feature gradients come out of one backward
    pass as K separate tensors; stacking them into K x B x D is a full copy that only the Jacobian-reading aggregators,
    gradient accumulation and data-parallel gathering need (:meth:`stack`, remembered), while :func:`gramian` and
    :func:`combine` read the rows where they are (and skip the zero ones)."""

    rows: tuple[Tensor | None, ...]
    row_shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    _stacked: Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, block: Tensor) -> Rows:
        """The rows of a stacked K x ... block (views; its stack is the block itself)."""
        return cls(tuple(block.unbind(0)), block.shape[1:], block.dtype, block.device, block)

    def stack(self) -> Tensor:
        """The K x (row_shape) tensor, zeros in the missing rows (built once)."""
        if self._stacked is None:
            zero = None
            full = []
            for r in self.rows:
                if r is None:
                    zero = torch.zeros(self.row_shape, dtype=self.dtype, device=self.device) if zero is None else zero
                full.append(zero if r is None else r)
            self._stacked = torch.stack(full)
        return self._stacked


@dataclass(eq=False)
class Factored:
    """One block of the K-row per-task Jacobian of a feature that every task reads through a linear head, kept in
    factors: row k is ``deltas[k] @ maps[k]``, task k's gradient with respect to its head's outputs (rows x o_k)
    times the head's weight (o_k x D), never formed unless asked (:meth:`stack`).

    The float64 Gramian then costs two small products instead of K^2 passes over K rows x D gradients:
    G_kl = Σ_r δ_k[r] (W_k W_l^T) δ_l[r], the sum over the (k, l) block of (Δ^T Δ) ⊙ (W W^T) with Δ = [δ_1 ... δ_K]
    and W the heads' weights stacked; the update Σ_k w_k J_k is one product [w_1 δ_1 ... w_K δ_K] W
    (:func:`gramian`, :func:`combine`)."""

    deltas: tuple[Tensor, ...]
    maps: tuple[Tensor, ...]
    _stacked: Tensor | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The rows' dtype (the output gradients')."""
        return self.deltas[0].dtype

    @property
    def device(self) -> torch.device:
        """Where the factors lie."""
        return self.deltas[0].device

    @property
    def row_shape(self) -> torch.Size:
        """One row's shape: the feature's (the output gradient's leading shape, then the head's input size)."""
        return torch.Size((*self.deltas[0].shape[:-1], self.maps[0].shape[1]))

    def stack(self) -> Tensor:
        """The K x (row_shape) tensor (built once)."""
        if self._stacked is None:
            self._stacked = torch.stack([d @ m for d, m in zip(self.deltas, self.maps, strict=True)])
        return self._stacked

    def gram(self) -> Tensor:
        """G = J J^T (K x K) in float64 from the factors."""
        d = torch.cat(self.deltas, -1).reshape(-1, sum(x.shape[-1] for x in self.deltas)).to(torch.float64)
        m = torch.cat(self.maps).to(torch.float64)
        owner = torch.repeat_interleave(torch.arange(len(self.deltas), device=d.device),
                                        torch.tensor([x.shape[-1] for x in self.deltas], device=d.device))
        e = torch.nn.functional.one_hot(owner, len(self.deltas)).to(torch.float64)
        return e.T @ ((d.T @ d) * (m @ m.T)) @ e

    def combine(self, weights: Tensor) -> Tensor:
        """Σ_k w_k J_k in the block's dtype."""
        w = weights.to(self.device, self.dtype)
        return torch.cat([d * w[k] for k, d in enumerate(self.deltas)], -1) @ torch.cat(self.maps)


Block = Tensor | Rows | Factored


def dense(block: Block) -> Tensor:
    """A block as one K x ... tensor (a :class:`Rows` or :class:`Factored` stacked)."""
    return block.stack() if isinstance(block, Rows | Factored) else block


def feature_rows(losses: Sequence[Tensor], features: Sequence[Tensor], reads: Sequence[Sequence[int]],
                 heads: Sequence[Sequence[Tensor]], into: Sequence[int] | None = None
                 ) -> tuple[list[Rows], list[list[Tensor]]]:
    """Per-task gradients of the K scalar ``losses`` with respect to the features each task reads, and each task's
    gradient with respect to its own head parameters.

    ``reads[k]``: indices into ``features`` that task k reads; ``heads[k]``: task k's own parameters. Returns
    ``(blocks, head_grads)``: ``blocks[b]`` is the :class:`Rows` of block b, row k = dL_k/d(the feature of block b
    that task k reads), None where task k reads none; features go to block ``into[j]`` (default: one block per
    feature; the features of one block share a shape). ``head_grads[k][i]`` = dL_k/d heads[k][i].

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
        total = (live[0] if len(live) == 1 else torch.stack(live).sum()) if live else None
        grads = list(torch.autograd.grad(total, wanted, allow_unused=True, materialize_grads=True)) \
            if total is not None else [torch.zeros_like(w) for w in wanted]
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
    blocks = [Rows(tuple(col), z.shape, z.dtype, z.device) for col, z in zip(rows, like, strict=True)]
    return blocks, [hg for _, hg in per_task]


def feature_jacobians(losses: Sequence[Tensor], features: Sequence[Tensor], reads: Sequence[Sequence[int]],
                      heads: Sequence[Sequence[Tensor]], into: Sequence[int] | None = None
                      ) -> tuple[list[Tensor], list[list[Tensor]]]:
    """:func:`feature_rows` with every block stacked into one K x (feature shape) tensor (zero where task k reads
    none of the block)."""
    blocks, head_grads = feature_rows(losses, features, reads, heads, into)
    return [b.stack() for b in blocks], head_grads


def through(outputs: Sequence[Tensor], inputs: Sequence[Tensor], blocks: Sequence[Block], chunk: int = 0
            ) -> list[Tensor]:
    """Push K row-gradients of ``outputs`` back to ``inputs`` in one batched vector-Jacobian product: for every
    row k, d(sum_o <outputs[o], blocks[o][k]>)/d inputs[i]; a list of (K, *inputs[i].shape) tensors.

    With ``blocks`` the per-task feature gradients this is the exact per-task Jacobian of the parameters below the
    features, K backward passes vectorised; ``chunk`` > 0 does at most that many rows at a time. The graph is
    freed after the last chunk."""
    blocks = [dense(b) for b in blocks]
    k = blocks[0].shape[0]
    step = chunk if chunk > 0 else k
    parts = [_rows_of(torch.autograd.grad(list(outputs), list(inputs), grad_outputs=[b[i:i + step] for b in blocks],
                                          is_grads_batched=True, retain_graph=i + step < k, allow_unused=True,
                                          materialize_grads=True), inputs, min(step, k - i)) for i in range(0, k, step)]
    return list(parts[0]) if len(parts) == 1 else [torch.cat(col) for col in zip(*parts, strict=True)]


def flat(grads: Sequence[Block]) -> Tensor:
    """Concatenate (K, ...) gradient blocks into one K x P matrix."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in map(dense, grads)], dim=1)


_LOCAL = threading.local()
_CHUNK = 65536  # float64 values per chunk of the CPU upcast (512 KB: stays in a core's L2 with its product)


def _work(n: int) -> Tensor:
    """A float64 CPU buffer of at least ``n`` values, one per thread, reused from call to call (a fresh 512 KB
    buffer per step cost ~400 page faults a step)."""
    buf = getattr(_LOCAL, "work", None)
    if buf is None or buf.numel() < n:
        buf = _LOCAL.work = torch.empty(n, dtype=torch.float64)
    return buf


def _gram_rows(out: Tensor, rows: Sequence[Tensor]) -> None:
    """out += R R^T in float64 for the rows R (tensors of one shape, each flattened), upcast chunk by chunk.

    On the CPU, rows not already float64 are copied by chunks of columns into one reused float64 buffer (one
    ``_foreach_copy_`` per chunk: the K row pieces in one call), each chunk's product added in place; the chunk
    (``_CHUNK`` values) stays in cache between the upcast and the product. Rows that fit in one chunk are upcast
    by one ``stack`` into the buffer (small models: the fewest calls). Elsewhere the rows are stacked and upcast
    whole."""
    n = len(rows)
    if rows[0].device.type != "cpu" or rows[0].dtype == torch.float64:
        m = torch.stack(list(rows)).reshape(n, -1).to(torch.float64)
        out.addmm_(m, m.T)
        return
    step = max(256, _CHUNK // n)
    size = rows[0].numel()
    if size <= step:
        w = _work(n * size)[:n * size].view(n, *rows[0].shape)
        torch.stack(list(rows), out=w)
        m = w.view(n, size)
        out.addmm_(m, m.T)
        return
    whole = _work(n * step)[:n * step].view(n, step)
    targets = list(whole.unbind(0))  # the buffer's row views, made once for every full-width chunk
    parts = [r.reshape(-1).split(step) for r in rows]
    for c in range(len(parts[0])):
        pieces = [p[c] for p in parts]
        width = pieces[0].numel()
        w = whole if width == step else whole.reshape(-1)[:n * width].view(n, width)
        torch._foreach_copy_(targets if width == step else list(w.unbind(0)), pieces)
        out.addmm_(w, w.T)


def _gram_matrix(out: Tensor, m: Tensor) -> None:
    """out += M M^T in float64 for a K x P matrix M (a stacked block), upcast chunk by chunk as :func:`_gram_rows`."""
    if m.device.type != "cpu" or m.dtype == torch.float64:
        m = m.to(torch.float64)
        out.addmm_(m, m.T)
        return
    step = max(256, _CHUNK // m.shape[0])
    work = _work(m.shape[0] * step)
    for start in range(0, m.shape[1], step):
        c = m[:, start:start + step]
        w = work[:c.numel()].view(c.shape).copy_(c)
        out.addmm_(w, w.T)


def gramian(blocks: Sequence[Block]) -> Tensor:
    """G = J J^T in float64, summed over blocks of J's columns (no K x P concatenation).

    Every block is multiplied in float64, whatever the gradients' dtype: on nearly dependent gradients the
    small eigenvalues of G, which decide MGDA, IMTL-G, Nash-MTL, ConFIG and the dual-cone projections, are
    below float32's rounding of the large ones (a float32 product gave cosines 0.6-0.95 to the exact
    direction, and ConFIG a zero update). A product of two float32 numbers is exact in float64, so G is the exact
    Gramian up to float64 rounding of the sums. On the CPU the upcast goes by cache-sized chunks of columns
    (``_CHUNK`` values) into one buffer reused across calls, each chunk's product added in place (the upcast, not
    the product, is the cost; a fresh buffer a call cost page faults); elsewhere one block at a time.

    A :class:`Rows` block is read row by row where its rows lie (no K x ... stack), and its zero rows are skipped
    (their entries of G are zero). The full K x K product is formed: the upper triangle alone (three products of
    half the rows) was measured no faster at K = 10, the products being bound by reading the chunk, not by
    arithmetic."""
    first = blocks[0]
    k = len(first.rows) if isinstance(first, Rows) else len(first.deltas) if isinstance(first, Factored) \
        else first.shape[0]
    out = torch.zeros(k, k, dtype=torch.float64, device=first.device)
    for b in blocks:
        if isinstance(b, Factored) and b._stacked is None:
            out += b.gram()
        elif isinstance(b, Rows) and b._stacked is None:
            idx = [i for i, r in enumerate(b.rows) if r is not None]
            if not idx:
                continue
            rows = [b.rows[i] for i in idx]
            if len(idx) == k:
                _gram_rows(out, rows)
            else:
                part = torch.zeros(len(idx), len(idx), dtype=torch.float64, device=out.device)
                _gram_rows(part, rows)
                at = torch.tensor(idx, device=out.device)
                out[at[:, None], at] += part
        else:
            _gram_matrix(out, dense(b).reshape(k, -1))
    return out


def combine(weights: Tensor, blocks: Sequence[Block]) -> list[Tensor]:
    """Σ_k w_k J_k for each block (the update direction J^T w, block by block), in the blocks' dtype.

    A :class:`Rows` block is summed row by row in place (``addcmul_``, no K x ... stack and no host sync), its zero
    rows skipped; a stacked block in one ``tensordot``. Both round in the blocks' dtype (float32: the update is
    applied in float32 anyway)."""
    out = []
    for b in blocks:
        w = weights.to(b.device, b.dtype)
        if isinstance(b, Factored) and b._stacked is None:
            out.append(b.combine(w))
        elif isinstance(b, Rows) and b._stacked is None:
            acc: Tensor | None = None
            for i, r in enumerate(b.rows):
                if r is not None:
                    acc = r * w[i] if acc is None else acc.addcmul_(r, w[i])
            out.append(acc if acc is not None else torch.zeros(b.row_shape, dtype=b.dtype, device=b.device))
        else:
            out.append(torch.tensordot(w, dense(b), dims=1))
    return out


def split(direction: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Cut a flat P-vector back into blocks shaped like ``like[i].shape[1:]``."""
    sizes = [b[0].numel() for b in like]
    return [d.reshape(b.shape[1:]).to(b.device) for d, b in zip(direction.split(sizes), like, strict=True)]
