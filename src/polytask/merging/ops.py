"""The shared parts of task-vector merging: sparsify x sign consensus x combine.

Task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024) and Model
Breadcrumbs (Davari & Belilovsky 2024) are one family: compute each model's task vector
``tau_k = theta_k - theta_0``, sparsify it (nothing, top-k magnitude, random drop, or a magnitude band),
weight it, optionally keep only the entries that agree with an elected sign, then sum (or average) and
add ``lambda`` times the result to the base. :func:`generalized_task_arithmetic` is that recipe (the
shape of mergekit's "generalized task arithmetic"); the named methods in
:mod:`polytask.merging.methods` only fix its parts.

Every function here is pure unless called with ``inplace=True``/``consume=True``, which lets the
streaming merge reuse the buffers it has just read instead of allocating copies. Elementwise work runs
over fixed-size chunks so temporaries stay small whatever the tensor size.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK = 1 << 20  # elements per chunk of elementwise work
_LITTLE = sys.byteorder == "little"


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


def own(t: Tensor, consume: bool) -> Tensor:
    """``t`` itself when the caller hands it over (and it is contiguous), else a contiguous copy."""
    return t if consume and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def kth_largest_abs(t: Tensor, k: int) -> float:
    """The ``k``-th largest ``|t|`` (1-based), exactly.

    float32 uses a two-pass radix select on the bit patterns (for non-negative floats the integer order of
    the bits is the numeric order): a histogram of the top 16 bits finds the bucket holding the k-th
    value, a histogram of the low 16 bits inside that bucket finds the value. That is several times
    faster than ``torch.kthvalue`` on CPU and needs no copy of the tensor. Other dtypes use kthvalue.
    """
    n = t.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside 1..{n}")
    flat = t.reshape(-1)
    if flat.dtype != torch.float32:
        return float(torch.kthvalue(flat.abs().float(), n - k + 1).values)
    bits = _kth_abs_bits(flat, k)
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _halves(c: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 16 bits of each float32 of ``c`` (int16 views, no copy)."""
    v = c.view(torch.int16)
    return (v[1::2], v[0::2]) if _LITTLE else (v[0::2], v[1::2])


def _kth_abs_bits(flat: Tensor, k: int) -> int:
    """The bit pattern of the k-th largest |x| of a contiguous float32 vector (radix select, two passes)."""
    n = flat.numel()
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for s in _chunks(n):
        hi, _ = _halves(flat[s:s + CHUNK])
        hist += torch.bincount(hi & 0x7FFF, minlength=1 << 15)
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, k))
    bucket = (1 << 15) - 1 - i
    above = int(from_top[i - 1]) if i > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for s in _chunks(n):
        hi, lo = _halves(flat[s:s + CHUNK])
        inside = lo[(hi & 0x7FFF) == bucket].to(torch.int32) & 0xFFFF
        low += torch.bincount(inside, minlength=1 << 16)
    j = int(torch.searchsorted(low.flip(0).cumsum(0), k - above))
    return (bucket << 16) | ((1 << 16) - 1 - j)


def magnitude_prune(tau: Tensor, density: float, *, inplace: bool = False) -> Tensor:
    """TIES' trim step (Yadav et al. 2023): keep the ``density`` fraction of entries of ``tau`` with the
    largest magnitude, zero the rest. k = max(1, int(density * numel)) as in mergekit; entries tied with the
    k-th magnitude are all kept."""
    out = own(tau, inplace)
    n = out.numel()
    if density >= 1 or n == 0:
        return out
    if density <= 0:
        return out.zero_()
    k = max(1, int(density * n))
    flat = out.view(-1)
    if flat.dtype == torch.float32:
        thr_bits = _kth_abs_bits(flat, k)
        for s in _chunks(n):
            c = flat[s:s + CHUNK]
            c.mul_((c.view(torch.int32) & 0x7FFFFFFF) >= thr_bits)
        return out
    thr = kth_largest_abs(out, k)
    for s in _chunks(n):
        c = flat[s:s + CHUNK]
        c.mul_(c.abs() >= thr)
    return out


def magnitude_band(tau: Tensor, density: float, gamma: float, *, inplace: bool = False) -> Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2024): drop the ``gamma`` fraction of entries with the
    largest magnitude (outliers) and the smallest ones, keeping ``density`` of the entries (the band just
    below the outliers; with ``density + gamma > 1`` fewer outliers are dropped, as in mergekit)."""
    out = own(tau, inplace)
    n = out.numel()
    if density >= 1 or n == 0:
        return out
    keep = int(density * n)
    if keep <= 0:
        return out.zero_()
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    hi = kth_largest_abs(out, n - (n_bot + keep - 1))
    lo = kth_largest_abs(out, n - n_bot)
    flat = out.view(-1)
    for s in _chunks(n):
        c = flat[s:s + CHUNK]
        a = c.abs()
        c.mul_((a >= lo) & (a <= hi))
    return out


def random_drop(tau: Tensor, drop_rate: float, generator: torch.Generator, *, rescale: bool = True,
                inplace: bool = False) -> Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with probability ``p``
    and rescale the survivors by 1/(1-p), so the task vector is unchanged in expectation."""
    out = own(tau, inplace)
    if drop_rate <= 0 or out.numel() == 0:
        return out
    if drop_rate >= 1:
        return out.zero_()
    keep = torch.empty(out.shape, dtype=torch.uint8).bernoulli_(1 - drop_rate, generator=generator)
    out.mul_(keep)
    if rescale:
        out.div_(1 - drop_rate)
    return out


def _combine_chunk(base: Tensor, taus: list[Tensor], weights: Sequence[float], consensus: bool,
                   normalize: bool, lam: float, work: Tensor | None = None) -> None:
    """Merge one chunk in place: ``base += lam * combine(taus)``, where combine is the sum of the weighted
    task vectors, divided by the summed weights if ``normalize``; with ``consensus`` only the entries that
    agree with the elected sign count (the disjoint mean of TIES). ``taus[0]`` is used as workspace."""
    if not consensus:
        mixed = taus[0]
        for t in taus[1:]:
            mixed += t
        total_w = float(sum(weights))
        if normalize and abs(total_w) >= 1e-8:
            mixed /= total_w
        if lam != 1:
            mixed *= lam
        base += mixed
        return
    # Sign election with every entry turned positive: x_k = t_k * sgn > 0 exactly where t_k agrees with the
    # elected sign sgn (+1 where the sum is >= 0); the sum of the agreeing entries is sgn * sum_k max(x_k, 0),
    # bit for bit the sum of the agreeing t_k (multiplying by +-1 and adding zeros are exact).
    n = base.numel()
    if work is None or work.shape[1] < n:
        work = torch.empty((4, n), dtype=base.dtype)
    total, sgn, mixed, divisor = (w[:n] for w in work)
    total.copy_(taus[0])
    for t in taus[1:]:
        total += t
    torch.copysign(sgn.fill_(1), total, out=sgn)
    mixed.zero_()
    divisor.zero_()
    x = total
    for t, w in zip(taus, weights, strict=True):
        torch.mul(t, sgn, out=x)
        if w == 1:
            divisor += x > 0
        else:
            divisor.add_(x > 0, alpha=w)
        mixed += x.clamp_(min=0)
    divisor += divisor == 0
    if normalize:
        mixed /= divisor
    mixed *= sgn
    if lam != 1:
        mixed *= lam
    base += mixed


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sparsify: str | Sequence[str] = "none",
    density: Sequence[float] | None = None,
    drop_rate: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    rescale: bool = True,
    consume: bool = False,
) -> Tensor:
    """``base + lam * combine(weight_k * sparsify(theta_k - base))`` for one tensor.

    ``sparsify``: one step or a sequence of steps applied in order: ``none``, ``magnitude`` (TIES trim,
    per-model ``density``), ``random`` (DARE, per-model ``drop_rate`` and generator) or ``band``
    (breadcrumbs, per-model ``density`` and ``gamma``).
    ``consensus``: keep only entries whose sign agrees with the elected sign (TIES). ``normalize``: divide
    by the summed weights (of the agreeing entries, with consensus) - the disjoint mean.
    With ``consume`` the function may overwrite ``base`` and ``tensors`` (the streaming merge owns them).
    """
    k = len(tensors)
    if k == 0:
        return own(base, consume)
    steps = [sparsify] if isinstance(sparsify, str) else list(sparsify)
    taus = []
    for i, t in enumerate(tensors):
        tau = own(t, consume)
        tau -= base
        for step in steps:
            if step == "random":
                random_drop(tau, drop_rate[i], generators[i], rescale=rescale, inplace=True)
            elif step == "magnitude":
                magnitude_prune(tau, density[i], inplace=True)
            elif step == "band":
                magnitude_band(tau, density[i], gamma[i], inplace=True)
            elif step != "none":
                raise ValueError(f"unknown sparsification {step!r}")
        if weights[i] != 1:
            tau *= weights[i]
        taus.append(tau.reshape(-1))
    out = own(base, consume)
    flat = out.view(-1)
    work = torch.empty((4, min(CHUNK, flat.numel())), dtype=flat.dtype) if consensus else None
    for s in _chunks(flat.numel()):
        _combine_chunk(flat[s:s + CHUNK], [t[s:s + CHUNK] for t in taus], weights, consensus, normalize, lam, work)
    return out


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float], *, consume: bool = False) -> Tensor:
    """Weight averaging (Wortsman et al. 2022, "Model soups"): ``sum_k w_k theta_k / sum_k w_k``."""
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise ValueError("the model weights sum to zero")
    out = own(tensors[0], consume)
    if weights[0] != 1:
        out *= weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t, alpha=w)
    return out.div_(total)


def squared_norm(t: Tensor) -> float:
    """``||t||^2`` in float64 (for coefficients computed from norms)."""
    return float(t.double().pow(2).sum()) if t.numel() else 0.0
