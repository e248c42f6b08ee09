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
over fixed-size chunks so temporaries stay small whatever the tensor size, and the larger temporaries live
in per-thread workspaces that are reused (a fresh large allocation costs a page fault per 4 KiB, which on
a VM is more than the arithmetic done on it).

Trims keep an exact number of entries. A trim threshold of one tensor is an exact order statistic of the
magnitudes (``numpy.partition`` on their float32 bit patterns, in place in a workspace); over a whole
model (``trim_scope: model``) it comes from two histogram passes over every tensor (:class:`RadixSelect`).
Entries tied with the threshold are kept in index order until exactly k are kept (``first``, the default),
or all of them (``all``, the official TIES code's ``>= kthvalue``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CHUNK = 1 << 20  # elements per chunk of elementwise work
_caches: dict[int, dict[tuple[str, torch.dtype], Tensor]] = {}


WORKERS = min(4, os.cpu_count() or 1)  # threads that sparsify the models' task vectors of one tensor at once
PARALLEL_MIN = 1 << 16  # smaller tensors are sparsified in the calling thread
_executor: ThreadPoolExecutor | None = None


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


def _pool() -> ThreadPoolExecutor:
    """The threads that sparsify task vectors in parallel (numpy's partition runs on one core; torch's
    elementwise kernels release the GIL, so the models of one tensor proceed side by side)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="polytask-sparsify")
    return _executor


def workspace(n: int, dtype: torch.dtype, slot: str = "") -> Tensor:
    """A 1-D buffer of ``n`` entries reused by this thread's later calls (grown when needed)."""
    cache = _caches.setdefault(threading.get_ident(), {})
    t = cache.get((slot, dtype))
    if t is None or t.numel() < n:
        t = cache[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return t[:n]


def release_workspaces() -> None:
    """Drop every thread's workspaces (the streaming merge calls it when it is done; a call still running
    keeps the buffers it holds)."""
    _caches.clear()


def own(t: Tensor, consume: bool) -> Tensor:
    """``t`` itself when the caller hands it over (and it is contiguous), else a contiguous copy."""
    return t if consume and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


MAX_KEY = 0x7FFFFFFF  # the magnitude key of a NaN with every payload bit set; keys are never larger


def magnitude_keys(x: Tensor, out: Tensor | None = None) -> Tensor:
    """int32 keys that order ``|x|`` (compared as float32): for non-negative floats the integer order of the
    bit patterns is the numeric order, so ``|x|`` is ``x``'s bits without the sign bit. NaN sorts above inf."""
    f = x if x.dtype == torch.float32 else x.float()
    return torch.bitwise_and(f.view(torch.int32), MAX_KEY, out=out)


@dataclass(frozen=True)
class Threshold:
    """The ``rank``-th largest magnitude key of a tensor (or of a whole task vector) and how many entries
    have a larger key (``greater``) or this key (``equal``): ``greater < rank <= greater + equal``."""

    key: int
    greater: int
    equal: int


class RadixSelect:
    """Exact rank selection of magnitude keys over a stream of tensors, in two passes (radix select): the
    first counts the top 16 bits of every key, which finds the bucket holding each wanted rank; the second
    counts the low 16 bits of the keys inside those buckets. Memory: the histograms, whatever the stream."""

    def __init__(self) -> None:
        self.n = 0
        self.high = torch.zeros(1 << 15, dtype=torch.int64)
        self.low: dict[int, Tensor] = {}
        self.where: dict[int, tuple[int, int]] = {}

    def count_high(self, x: Tensor) -> None:
        """First pass: one tensor of the stream."""
        flat = x.reshape(-1)
        self.n += flat.numel()
        for s in _chunks(flat.numel()):
            self.high += torch.bincount(magnitude_keys(flat[s:s + CHUNK]) >> 16, minlength=1 << 15)

    def locate(self, ranks: Sequence[int]) -> None:
        """Between the passes: the bucket of each rank (1 = the largest)."""
        from_top = self.high.flip(0).cumsum(0)
        for r in ranks:
            if not 1 <= r <= self.n:
                raise ValueError(f"rank {r} is outside 1..{self.n}")
            i = int(torch.searchsorted(from_top, r))
            self.where[r] = ((1 << 15) - 1 - i, int(from_top[i - 1]) if i else 0)
        self.low = {b: torch.zeros(1 << 16, dtype=torch.int64) for b, _ in self.where.values()}

    def count_low(self, x: Tensor) -> None:
        """Second pass: one tensor of the stream (in any order)."""
        flat = x.reshape(-1)
        for s in _chunks(flat.numel()):
            keys = magnitude_keys(flat[s:s + CHUNK])
            high = keys >> 16
            for b, hist in self.low.items():
                hist += torch.bincount(keys[high == b] & 0xFFFF, minlength=1 << 16)

    def thresholds(self) -> dict[int, Threshold]:
        """After the second pass: the threshold of every located rank."""
        out = {}
        for r, (b, above) in self.where.items():
            low = self.low[b]
            from_top = low.flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, r - above))
            lo = (1 << 16) - 1 - j
            out[r] = Threshold((b << 16) | lo, above + (int(from_top[j - 1]) if j else 0), int(low[lo]))
        return out


def thresholds(t: Tensor, ranks: Sequence[int]) -> dict[int, Threshold]:
    """The threshold of each rank (1 = the largest magnitude) of one tensor, exactly: its magnitude keys are
    written to a workspace and partitioned in place (introselect, O(n)), the largest rank first so that each
    further rank partitions only the entries above the previous one."""
    flat = t.reshape(-1)
    n = flat.numel()
    for r in ranks:
        if not 1 <= r <= n:
            raise ValueError(f"rank {r} is outside 1..{n}")
    keys = workspace(n, torch.int32, "select")
    for s in _chunks(n):
        magnitude_keys(flat[s:s + CHUNK], out=keys[s:s + CHUNK])
    arr = keys.numpy()
    out = {}
    lo = 0
    for r in sorted(set(ranks), reverse=True):
        i = n - r
        arr[lo:].partition(i - lo)
        key = int(arr[i])
        above = _count_equal(arr[i + 1:], key)
        below = _count_equal(arr[:i], key) if i and int(arr[:i].max()) == key else 0
        out[r] = Threshold(key, r - 1 - above, 1 + above + below)
        lo = i + 1
    return out


def _count_equal(a: np.ndarray, value: int) -> int:
    return sum(int(np.count_nonzero(a[s:s + CHUNK] == value)) for s in range(0, len(a), CHUNK))


def kth_largest_abs(t: Tensor, k: int) -> float:
    """The ``k``-th largest ``|t|`` (1-based) as a float32 value, exactly."""
    key = thresholds(t, [k])[k].key
    return float(torch.tensor([key], dtype=torch.int32).view(torch.float32))


@dataclass
class Cut:
    """The top of a magnitude ranking: every entry whose key is above ``key``, and the first ``ties`` of the
    ``equal`` entries whose key is ``key`` (first in index order; for a model-wide cut, in the order the
    tensors are merged). ``used`` counts the ties already kept (a model-wide cut is applied tensor by tensor)."""

    key: int
    ties: int
    equal: int
    used: int = 0

    @classmethod
    def of(cls, th: Threshold, rank: int, rule: str) -> Cut:
        """The top ``rank`` entries: exactly ``rank`` with ``first``; with ``all`` every entry tied with the
        rank-th is kept too."""
        return cls(th.key, th.equal if rule == "all" else rank - th.greater, th.equal)

    def bits(self, keys: Tensor, out: Tensor) -> Tensor:
        """Which entries of the next chunk (in order) are in the top, as int32 bit masks in ``out``: -1 (every
        bit set) for an entry in the top, 0 otherwise (bool masks take slow paths in torch's CPU kernels)."""
        if self.ties >= self.equal:
            return _at_least(keys, self.key, out)
        left = self.ties - self.used
        if left <= 0:
            return _at_least(keys, self.key + 1, out)
        equal = keys.numpy() == self.key
        c = int(np.count_nonzero(equal))
        if c <= left:
            self.used += c
            return _at_least(keys, self.key, out)
        cut = int(np.flatnonzero(equal)[left - 1]) + 1  # the tied entries before it are kept, none after
        self.used += left
        _at_least(keys[:cut], self.key, out[:cut])
        _at_least(keys[cut:], self.key + 1, out[cut:])
        return out

    def shrink(self, c: Tensor, keys_ws: Tensor) -> None:
        """Zero the entries of the next float32 chunk ``c`` that are not in the top, in place: one
        ``hardshrink`` (keeps ``|x| > lambda``) with lambda just below the threshold, or at it once the ties
        are used up; the keys are computed only to count ties before the cut."""
        if self.ties >= self.equal:
            _shrink(c, self.key)
            return
        left = self.ties - self.used
        if left <= 0:
            _shrink(c, self.key + 1)
            return
        equal = magnitude_keys(c, out=keys_ws[:len(c)]).numpy() == self.key
        n_equal = int(np.count_nonzero(equal))
        if n_equal <= left:
            self.used += n_equal
            _shrink(c, self.key)
            return
        cut = int(np.flatnonzero(equal)[left - 1]) + 1
        self.used += left
        _shrink(c[:cut], self.key)
        _shrink(c[cut:], self.key + 1)


def _shrink(c: Tensor, key: int) -> None:
    """Keep the entries of float32 ``c`` whose magnitude key is at least ``key``, zero the others."""
    if key > MAX_KEY:
        c.zero_()
    elif key > 0:  # |x| >= the float with bits key  <=>  |x| > the float just below it
        below = float(torch.tensor([key - 1], dtype=torch.int32).view(torch.float32))
        torch.hardshrink(c, below, out=c)


def _at_least(keys: Tensor, key: int, out: Tensor) -> Tensor:
    """-1 where ``keys >= key``, else 0, as int32: the sign bit of ``key - 1 - keys`` spread by an arithmetic
    shift (keys and key lie in [0, 2^31], so the difference cannot overflow)."""
    if key > MAX_KEY:
        return out.zero_()
    return torch.sub(key - 1, keys, out=out).bitwise_right_shift_(31)


@dataclass
class Trim:
    """Which entries of a task vector survive a magnitude trim: the top ``keep`` minus the top ``drop``
    (the outliers Model Breadcrumbs removes). ``keep`` None keeps nothing."""

    keep: Cut | None
    drop: Cut | None = None


def trim_ranks(kind: str, n: int, density: float, gamma: float = 0.0) -> tuple[int, int] | None:
    """(keep, drop) ranks of a trim of ``n`` entries, or None when nothing is trimmed.

    ``magnitude`` (TIES): the top ``k = max(1, int(density * n))`` (as mergekit; density 0 keeps nothing).
    ``band`` (breadcrumbs): ``int(density * n)`` entries below the ``int(gamma * n)`` largest; with
    density + gamma > 1 fewer outliers are dropped, as in mergekit."""
    if density >= 1 or n == 0:
        return None
    if kind == "magnitude":
        return (max(1, int(density * n)) if density > 0 else 0), 0
    keep = int(density * n)
    if keep <= 0:
        return 0, 0
    n_bot = max(0, n - keep - int(gamma * n))
    return n - n_bot, n - n_bot - keep


def needed_ranks(keep: int, drop: int, rule: str) -> list[int]:
    """The ranks whose thresholds a trim with these ranks needs."""
    out = [keep] if keep > 0 else []
    if keep > 0 and drop > 0:
        out.append(drop + 1 if rule == "all" else drop)
    return out


def trim_of(ths: dict[int, Threshold], keep: int, drop: int, rule: str) -> Trim:
    """The trim keeping the top ``keep`` minus the top ``drop`` entries, from the thresholds of those ranks.
    With ``all`` ties are resolved towards keeping: every entry tied with the keep-th is kept, and only the
    entries strictly above the (drop+1)-th are dropped."""
    if keep <= 0:
        return Trim(None)
    cut = Cut.of(ths[keep], keep, rule)
    if drop <= 0:
        return Trim(cut)
    if rule == "all":
        th = ths[drop + 1]
        return Trim(cut, Cut(th.key, 0, th.equal))
    return Trim(cut, Cut.of(ths[drop], drop, rule))


def tensor_trim(tau: Tensor, kind: str, density: float, gamma: float = 0.0, rule: str = "first") -> Trim | None:
    """The trim of one tensor by its own magnitudes (``trim_scope: tensor``)."""
    ranks = trim_ranks(kind, tau.numel(), density, gamma)
    if ranks is None:
        return None
    return trim_of(thresholds(tau, needed_ranks(*ranks, rule)) if ranks[0] > 0 else {}, *ranks, rule)


def apply_trim(tau: Tensor, trim: Trim | None) -> Tensor:
    """Zero the entries of ``tau`` (in place) that ``trim`` does not keep."""
    if trim is None:
        return tau
    if trim.keep is None:
        return tau.zero_()
    flat = tau.view(-1)
    n = min(CHUNK, flat.numel())
    keys_ws = workspace(n, torch.int32, "trim")
    if trim.drop is None and tau.dtype == torch.float32:
        for s in _chunks(flat.numel()):
            trim.keep.shrink(flat[s:s + CHUNK], keys_ws)
        return tau
    keep_ws, drop_ws = workspace(n, torch.int32, "keep"), workspace(n, torch.int32, "drop")
    for s in _chunks(flat.numel()):
        c = flat[s:s + CHUNK]
        m = len(c)
        keys = magnitude_keys(c, out=keys_ws[:m])
        keep = trim.keep.bits(keys, keep_ws[:m])
        if trim.drop is not None:
            keep.bitwise_and_(trim.drop.bits(keys, drop_ws[:m]).bitwise_not_())
        _and_mask(c, keep)
    return tau


def _and_mask(c: Tensor, bits: Tensor) -> None:
    """Zero the entries of ``c`` whose int32 mask ``bits`` is 0 (keep those at -1), in place."""
    if c.dtype == torch.float32:
        c.view(torch.int32).bitwise_and_(bits)
    else:
        c.mul_(bits.to(c.dtype).neg_())


def magnitude_prune(tau: Tensor, density: float, *, rule: str = "first", inplace: bool = False) -> Tensor:
    """TIES' trim step (Yadav et al. 2023): keep the ``density`` fraction of entries of ``tau`` with the largest
    magnitude, zero the rest. k = max(1, int(density * numel)) as in mergekit. ``rule``: ``first`` keeps exactly
    k (of the entries tied with the k-th magnitude, the first in index order); ``all`` keeps every tied entry
    (the official TIES code's ``>= kthvalue``), so possibly more than k."""
    out = own(tau, inplace)
    return apply_trim(out, tensor_trim(out, "magnitude", density, 0.0, rule))


def magnitude_band(tau: Tensor, density: float, gamma: float, *, rule: str = "first",
                   inplace: bool = False) -> Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2024): drop the ``gamma`` fraction of entries with the
    largest magnitude (outliers) and the smallest ones, keeping ``density`` of the entries (the band just
    below the outliers; with ``density + gamma > 1`` fewer outliers are dropped, as in mergekit). ``rule`` as
    in :func:`magnitude_prune` (``first``: exactly ``int(density * n)`` entries)."""
    out = own(tau, inplace)
    return apply_trim(out, tensor_trim(out, "band", density, gamma, rule))


def drop_stream(*entropy: int) -> np.random.PCG64:
    """A random stream for DARE's masks, a pure function of the integers given (e.g. seed, tensor, model)."""
    return np.random.PCG64(np.random.SeedSequence([int(e) % (1 << 64) for e in entropy]))


def random_drop(tau: Tensor, drop_rate: float, generator: np.random.BitGenerator, *, rescale: bool = True,
                inplace: bool = False) -> Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with probability ``p``
    and rescale the survivors by 1/(1-p), so the task vector is unchanged in expectation.

    Each entry's draw is 16 random bits of ``generator`` (four per 64-bit output, about 10x faster than one
    float draw per entry): the keep probability is 1-p rounded to a multiple of 2^-16, and survivors are
    rescaled by the inverse of that rounded probability, so the expectation is still exact."""
    out = own(tau, inplace)
    if drop_rate <= 0 or out.numel() == 0:
        return out
    keep = round((1 - drop_rate) * 65536)
    if keep <= 0:
        return out.zero_()
    if keep >= 65536:
        return out
    flat = out.view(-1)
    mask = workspace(min(CHUNK, flat.numel()), torch.int32, "dare")
    for s in _chunks(flat.numel()):
        c = flat[s:s + CHUNK]
        draws = torch.from_numpy(generator.random_raw((len(c) + 3) // 4).view(np.uint16)[:len(c)])
        m = mask[:len(c)].copy_(draws)  # uniform 16-bit u, kept where u < keep: the sign of u - keep
        _and_mask(c, m.sub_(keep).bitwise_right_shift_(31))
    if rescale:
        out.mul_(65536 / keep)
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
    for t, w in zip(taus, weights, strict=True):  # sign() of the clamped x is 1 where t agrees, else 0
        torch.mul(t, sgn, out=x).clamp_(min=0)
        mixed += x
        if normalize:
            divisor.add_(torch.sign(x, out=x), alpha=w)
    if normalize:
        if min(weights) > 0:  # a zero divisor has a zero sum over it; any positive stand-in gives 0 there
            divisor.clamp_(min=min(weights))
        else:
            divisor += divisor == 0
        mixed /= divisor
    mixed *= sgn
    if lam != 1:
        mixed *= lam
    base += mixed


TRIM_STEPS = ("magnitude", "band")


def task_vector(base: Tensor, t: Tensor, steps: Sequence[str], *, density: float = 1.0, drop_rate: float = 0.0,
                gamma: float = 0.0, generator: np.random.BitGenerator | None = None, rescale: bool = True,
                tie_rule: str = "first", trim: Trim | None = None, consume: bool = False) -> Tensor:
    """``sparsify(t - base)`` for one model, the sparsification ``steps`` applied in order: ``none``,
    ``random`` (DARE: ``drop_rate``, ``generator``), ``magnitude`` (TIES trim: ``density``) or ``band``
    (breadcrumbs: ``density``, ``gamma``). A trim decided beforehand over the whole model (``trim``) replaces
    the per-tensor selection of the magnitude/band step."""
    tau = own(t, consume)
    tau -= base
    for step in steps:
        if step == "random":
            random_drop(tau, drop_rate, generator, rescale=rescale, inplace=True)  # type: ignore[arg-type]
        elif step in TRIM_STEPS:
            apply_trim(tau, trim if trim is not None else tensor_trim(tau, step, density, gamma, tie_rule))
        elif step != "none":
            raise ValueError(f"unknown sparsification {step!r}")
    return tau


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sparsify: str | Sequence[str] = "none",
    density: Sequence[float] | None = None,
    drop_rate: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    generators: Sequence[np.random.BitGenerator] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    rescale: bool = True,
    tie_rule: str = "first",
    trims: Sequence[Trim | None] | None = None,
    consume: bool = False,
) -> Tensor:
    """``base + lam * combine(weight_k * sparsify(theta_k - base))`` for one tensor.

    ``sparsify``: one step or a sequence of steps applied in order (see :func:`task_vector`), with per-model
    ``density``, ``drop_rate``, ``gamma`` and ``generators``; ``tie_rule`` resolves ties at a trim threshold
    (see :func:`magnitude_prune`); ``trims``: per model, a trim decided over the whole model (model scope).
    ``consensus``: keep only entries whose sign agrees with the elected sign (TIES). ``normalize``: divide
    by the summed weights (of the agreeing entries, with consensus) - the disjoint mean.
    With ``consume`` the function may overwrite ``base`` and ``tensors`` (the streaming merge owns them).
    """
    k = len(tensors)
    if k == 0:
        return own(base, consume)
    steps = [sparsify] if isinstance(sparsify, str) else list(sparsify)

    def one(i: int) -> Tensor:
        tau = task_vector(base, tensors[i], steps, density=density[i] if density else 1.0,
                          drop_rate=drop_rate[i] if drop_rate else 0.0, gamma=gamma[i] if gamma else 0.0,
                          generator=generators[i] if generators else None, rescale=rescale, tie_rule=tie_rule,
                          trim=trims[i] if trims else None, consume=consume)
        if weights[i] != 1:
            tau *= weights[i]
        return tau.reshape(-1)

    parallel = any(s != "none" for s in steps) and base.numel() >= PARALLEL_MIN
    taus = list(_pool().map(one, range(k))) if parallel and WORKERS > 1 else [one(i) for i in range(k)]
    out = own(base, consume)
    flat = out.view(-1)
    m = min(CHUNK, flat.numel())
    work = workspace(4 * m, flat.dtype, "combine").view(4, m) if consensus else None
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
