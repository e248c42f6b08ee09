"""The shared parts of task-vector merging: sparsify x sign consensus x combine.

Task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024) and Model
Breadcrumbs (Davari & Belilovsky 2024) are one family: compute each model's task vector
``tau_k = theta_k - theta_0``, sparsify it (nothing, top-k magnitude, random drop, or a magnitude band),
weight it, optionally keep only the entries that agree with an elected sign, then sum (or average) and
add ``lambda`` times the result to the base. :func:`generalized_task_arithmetic` is that recipe (the
shape of mergekit's "generalized task arithmetic"); the named methods in
:mod:`polytask.merging.methods` only fix its parts.

Every function here is pure unless called with ``inplace=True``/``consume=True``, which lets the streaming
merge reuse the buffers it has just read instead of allocating copies. The models may stay in their stored
dtype (e.g. bfloat16): they are widened block by block (exactly, as a conversion would) into the workspace
where their task vectors are made, so no widened copy of a model is made. A tensor is merged block by block
(:data:`BLOCK` entries of every model, small enough to stay in a core's cache): the differences from the
base, their sparsification, weighting and combination all happen on the block, so no task vector is stored
whole; only a trim first reads each model's whole tensor, to rank it. Temporaries live in per-thread
workspaces that are reused (a fresh large allocation costs a page fault per 4 KiB, which on a VM is more
than the arithmetic done on it; ``torch.sub`` of a narrower model would allocate a widened copy per call),
and the work is split between worker threads that run torch's kernels on one thread each
(:func:`kernel_threads`). A block's masks (DARE's drop, the band of breadcrumbs) are made with numpy's
integer kernels, which cost a third of a torch call to launch and have the unsigned comparisons and
mixed-type products that make a mask in fewer passes; its floating-point arithmetic stays torch's, whose
choice among two NaN operands (their sign and payload) numpy does not share.

Trims keep an exact number of entries. A trim threshold of one tensor is an exact order statistic of the
magnitudes (``numpy.partition`` on their float32 bit patterns, in place in a workspace); over a whole
model (``trim_scope: model``) it comes from two histogram passes over every tensor (:class:`RadixSelect`).
Entries tied with the threshold are kept in index order until exactly k are kept (``first``, the default:
located in a copy of the keys in index order, a second workspace), or all of them (``all``, the official
TIES code's ``>= kthvalue``).
"""

from __future__ import annotations

import copy
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

CHUNK = 1 << 20  # elements per chunk of the whole-tensor work of one model (selection keys, trims, DARE masks)
BLOCK = 1 << 16  # entries per block of the combine: a block of every model's task vector stays in a core's cache
PIECE = 1 << 18  # entries per piece of one model's whole-tensor passes (magnitude keys): few calls, in cache
_caches: dict[int, dict[tuple[str, torch.dtype], Tensor]] = {}
R = TypeVar("R")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


WORKERS = min(8, _cpus())  # threads that work on one tensor at once: its models' task vectors, then its blocks
PARALLEL_MIN = 1 << 16  # smaller tensors are merged in the calling thread
_executor: ThreadPoolExecutor | None = None
_executor_size = 0
_merging: ContextVar[int | None] = ContextVar("polytask_merge_workers", default=None)  # inside kernel_threads


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


def _workers() -> int:
    return _merging.get() or WORKERS


def _pool(size: int) -> ThreadPoolExecutor:
    """The worker threads (numpy's partition and PCG64 run on one core; they and torch's kernels release the
    GIL, so the models of one tensor, and then its blocks, proceed side by side)."""
    global _executor, _executor_size
    if _executor is None or _executor_size != size:
        if _executor is not None:
            _executor.shutdown(wait=False)
        _executor, _executor_size = ThreadPoolExecutor(size, thread_name_prefix="polytask-merge-worker"), size
    return _executor


def parallel(fn: Callable[[int], R], n: int) -> list[R]:
    """``[fn(0), ..., fn(n - 1)]``, computed on the worker threads when there are several."""
    workers = _workers()
    if workers <= 1 or n <= 1:
        return [fn(i) for i in range(n)]
    one_thread = _merging.get() is not None

    def task(i: int) -> R:
        if one_thread and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # this worker's own setting (the process-wide one is 1 already)
        return fn(i)

    return list(_pool(workers).map(task, range(n)))


@contextmanager
def kernel_threads(workers: int = 0) -> Iterator[None]:
    """Run a merge's torch kernels on one thread each, parallel only on the merge's own threads (``workers``;
    0: :data:`WORKERS`), and restore torch's thread count afterwards. A kernel that starts an OpenMP team on
    cores the merge's readers and workers already use waits for them: elementwise kernels ran 7-14x slower
    with torch's default two threads than with one on a busy 2-core machine. Meanwhile torch's thread count
    is 1 for the whole process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    token = _merging.set(workers or WORKERS)
    try:
        yield
    finally:
        _merging.reset(token)
        torch.set_num_threads(before)


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
    """The threshold of each rank (1 = the largest magnitude) of one tensor, exactly (see :func:`_select`)."""
    flat = t.reshape(-1)
    keys = workspace(flat.numel(), torch.int32, "select")
    for s in _chunks(flat.numel()):
        magnitude_keys(flat[s:s + CHUNK], out=keys[s:s + CHUNK])
    arr = keys.numpy()
    return {r: Threshold(key, greater, _count_equal(arr, key)) for r, (key, greater) in
            _select(arr, ranks).items()}


def _select(arr: np.ndarray, ranks: Sequence[int]) -> dict[int, tuple[int, int]]:
    """The key of each rank (1 = the largest) of the magnitude keys ``arr`` and how many keys are larger,
    partitioning ``arr`` in place (introselect, O(n)), the largest rank first so that each further rank
    partitions only the entries above the previous one."""
    n = len(arr)
    for r in ranks:
        if not 1 <= r <= n:
            raise ValueError(f"rank {r} is outside 1..{n}")
    out = {}
    lo = 0
    for r in sorted(set(ranks), reverse=True):
        i = n - r
        arr[lo:].partition(i - lo)
        key = int(arr[i])
        out[r] = (key, r - 1 - _count_equal(arr[i + 1:], key))
        lo = i + 1
    return out


def _count_equal(a: np.ndarray, value: int) -> int:
    eq = np.empty(min(len(a), BLOCK), dtype=bool)  # reused: a fresh temporary per piece costs page faults
    return sum(int(np.count_nonzero(np.equal(a[s:s + BLOCK], value, out=eq[:len(a[s:s + BLOCK])])))
               for s in range(0, len(a), BLOCK))


def kth_largest_abs(t: Tensor, k: int) -> float:
    """The ``k``-th largest ``|t|`` (1-based) as a float32 value, exactly."""
    return _FLOAT.unpack(_INT.pack(thresholds(t, [k])[k].key))[0]


@dataclass(frozen=True)
class Edge:
    """One edge of a magnitude ranking on one tensor: the entries whose magnitude key is above ``key``, and
    those equal to it at positions before ``index``."""

    key: int
    index: int


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

    def needs_keys(self) -> bool:
        """Whether the next tensor's edge depends on where its tied entries are."""
        return self.ties < self.equal and self.ties > self.used

    def edge(self, find: Finder | None, n: int) -> Edge:
        """The edge on the next tensor (``n`` entries; ``find`` locates its tied entries, only asked when
        :meth:`needs_keys`), counting the ties it keeps as used."""
        if self.ties >= self.equal:
            return Edge(self.key, n)
        left = self.ties - self.used
        if left <= 0:
            return Edge(self.key, 0)
        assert find is not None
        index, seen = find(self.key, left)
        self.used += seen
        return Edge(self.key, index)


Finder = Callable[[int, int], tuple[int, int]]  # (key, m) -> (position after the m-th entry with that key, or n;
#                                                  how many of the first m there are)


def scan_finder(keys: np.ndarray) -> Finder:
    """A :data:`Finder` over a tensor's magnitude keys in index order."""

    def find(key: int, left: int) -> tuple[int, int]:
        seen = 0
        eq = np.empty(min(len(keys), PIECE), dtype=bool)
        for s in range(0, len(keys), PIECE):
            piece = keys[s:s + PIECE]
            equal = np.equal(piece, key, out=eq[:len(piece)])
            c = int(np.count_nonzero(equal))
            if seen + c >= left:
                return s + _nth_true(equal, left - seen) + 1, left
            seen += c
        return len(keys), seen

    return find


def _nth_true(mask: np.ndarray, nth: int) -> int:
    """The index of the ``nth`` (1-based) True of ``mask``, which has at least that many: found by counting
    small chunks first (the indices of every True of a large piece would be a large temporary)."""
    step = 8192
    for s in range(0, len(mask), step):
        chunk = mask[s:s + step]
        c = int(np.count_nonzero(chunk))
        if nth <= c:
            return s + int(np.flatnonzero(chunk)[nth - 1])
        nth -= c
    raise ValueError("the mask has fewer True entries than asked for")


@dataclass
class Trim:
    """Which entries of a task vector survive a magnitude trim: the top ``keep`` minus the top ``drop``
    (the outliers Model Breadcrumbs removes). ``keep`` None keeps nothing."""

    keep: Cut | None
    drop: Cut | None = None

    def needs_keys(self) -> bool:
        """Whether the next tensor's edges depend on where its tied entries are (see :meth:`Cut.needs_keys`)."""
        return any(c is not None and c.needs_keys() for c in (self.keep, self.drop))

    def on(self, find: Finder | None, n: int) -> TensorTrim:
        """This trim on the next tensor (see :meth:`Cut.edge`)."""
        return TensorTrim(None if self.keep is None else self.keep.edge(find, n),
                          None if self.drop is None or self.keep is None else self.drop.edge(find, n))


@dataclass(frozen=True)
class TensorTrim:
    """A trim resolved on one tensor: the entries inside ``keep`` and not inside ``drop`` survive (``keep``
    None: none survive)."""

    keep: Edge | None
    drop: Edge | None = None

    def apply(self, c: Tensor, start: int, keys_ws: Tensor) -> None:
        """Zero, in place, the entries of ``c`` (positions ``start``, ``start + 1``, ... of the tensor) that do
        not survive. Without outliers to drop a float32 block takes one or two ``hardshrink`` (which keeps
        ``|x| > lambda``); otherwise int32 masks from the magnitude keys (``keys_ws``: scratch)."""
        if self.keep is None:
            c.zero_()
            return
        if self.drop is None and c.dtype == torch.float32:
            cut = min(max(self.keep.index - start, 0), len(c))
            if cut:
                _shrink(c[:cut], self.keep.key)
            if cut < len(c):
                _shrink(c[cut:], self.keep.key + 1)
            return
        m = len(c)
        keys = magnitude_keys(c, out=keys_ws[:m])
        keep = _inside(keys, self.keep, start, keys_ws[m:2 * m])
        if self.drop is not None:
            keep.bitwise_and_(_inside(keys, self.drop, start, keys_ws[2 * m:3 * m]).bitwise_not_())
        _and_mask(c, keep)


def _inside(keys: Tensor, edge: Edge, start: int, out: Tensor) -> Tensor:
    """-1 (int32) where the entry is inside ``edge``, else 0."""
    cut = min(max(edge.index - start, 0), len(keys))
    _at_least(keys[:cut], edge.key, out[:cut])
    _at_least(keys[cut:], edge.key + 1, out[cut:])
    return out


def _shrink(c: Tensor, key: int) -> None:
    """Keep the entries of float32 ``c`` whose magnitude key is at least ``key``, zero the others."""
    if key > MAX_KEY:
        c.zero_()
    elif key > 0:  # |x| >= the float with bits key  <=>  |x| > the float just below it
        torch.hardshrink(c, _FLOAT.unpack(_INT.pack(key - 1))[0], out=c)


_INT, _FLOAT = struct.Struct("<i"), struct.Struct("<f")


def _at_least(keys: Tensor, key: int, out: Tensor) -> Tensor:
    """-1 where ``keys >= key``, else 0, as int32: the sign bit of ``key - 1 - keys`` spread by an arithmetic
    shift (keys and key lie in [0, 2^31], so the difference cannot overflow)."""
    if key > MAX_KEY:
        return out.zero_()
    return torch.sub(key - 1, keys, out=out).bitwise_right_shift_(31)


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


def tensor_trim(keys: np.ndarray, kind: str, density: float, gamma: float = 0.0, rule: str = "first",
                find: Finder | None = None) -> TensorTrim | None:
    """The trim of one tensor by its own magnitudes (``trim_scope: tensor``), from its magnitude ``keys``,
    which are partitioned in place; ``find`` locates tied entries in index order (default: in a copy of
    ``keys`` taken first)."""
    n = len(keys)
    ranks = trim_ranks(kind, n, density, gamma)
    if ranks is None:
        return None
    if ranks[0] <= 0:
        return TensorTrim(None)
    find = find or scan_finder(keys.copy())
    # the number of entries equal to a threshold key is at most n: an edge then counts the ties it keeps
    ths = {r: Threshold(key, greater, n) for r, (key, greater) in _select(keys, needed_ranks(*ranks, rule)).items()}
    return trim_of(ths, *ranks, rule).on(find, n)


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
    return sparsify(own(tau, inplace), ["magnitude"], density=density, tie_rule=rule)


def magnitude_band(tau: Tensor, density: float, gamma: float, *, rule: str = "first",
                   inplace: bool = False) -> Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2024): drop the ``gamma`` fraction of entries with the
    largest magnitude (outliers) and the smallest ones, keeping ``density`` of the entries (the band just
    below the outliers; with ``density + gamma > 1`` fewer outliers are dropped, as in mergekit). ``rule`` as
    in :func:`magnitude_prune` (``first``: exactly ``int(density * n)`` entries)."""
    return sparsify(own(tau, inplace), ["band"], density=density, gamma=gamma, tie_rule=rule)


def drop_stream(*entropy: int) -> np.random.PCG64:
    """A random stream for DARE's masks, a pure function of the integers given (e.g. seed, tensor, model)."""
    return np.random.PCG64(np.random.SeedSequence([int(e) % (1 << 64) for e in entropy]))


def _keep_of(drop_rate: float) -> int:
    """DARE's keep probability in units of 2^-16."""
    return round((1 - drop_rate) * 65536) if drop_rate > 0 else 65536


def random_drop(tau: Tensor, drop_rate: float, generator: np.random.BitGenerator, *, rescale: bool = True,
                inplace: bool = False) -> Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with probability ``p``
    and rescale the survivors by 1/(1-p), so the task vector is unchanged in expectation.

    Each entry's draw is 16 random bits of ``generator`` (four per 64-bit output, about 10x faster than one
    float draw per entry): the keep probability is 1-p rounded to a multiple of 2^-16, and survivors are
    rescaled by the inverse of that rounded probability, so the expectation is still exact. Entry ``i`` of
    the tensor takes bits ``16 * (i % 4)`` up of the stream's output ``i // 4``, so the mask does not depend on
    how the tensor is split into pieces (any piece but the last starts at a multiple of 4)."""
    out = own(tau, inplace)
    keep = _keep_of(drop_rate)
    if out.numel() == 0 or keep >= 65536:
        return out
    if keep <= 0:
        return out.zero_()
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


TRIM_STEPS = ("magnitude", "band")


@dataclass
class Sparsify:
    """The sparsification steps of one model's task vector on one tensor of ``n`` entries, in order: ``none``,
    ``random`` (DARE: ``drop_rate``, ``generator``), ``magnitude`` (TIES trim: ``density``) or ``band``
    (breadcrumbs: ``density``, ``gamma``); ``trim``: a trim decided beforehand over the whole model, which
    replaces the per-tensor ranking of the magnitude/band step.

    The steps run piece by piece (any pieces, in any order, on any thread): :meth:`resolve` first decides each
    trim on the whole tensor (a ranking needs every entry), then :meth:`apply` sparsifies a piece. A random
    step's piece draws from a copy of the stream moved to the piece's position (:meth:`streams`); a later
    random step continues the stream where the previous one ended, as if each step ran over the whole tensor."""

    steps: list[str]
    n: int
    density: float = 1.0
    drop_rate: float = 0.0
    gamma: float = 0.0
    generator: np.random.PCG64 | None = None
    rescale: bool = True
    rule: str = "first"
    trim: Trim | None = None
    trims: dict[int, TensorTrim | None] = field(default_factory=dict)
    offsets: dict[int, int] = field(init=False)  # random step -> where its draws start in the stream

    def __post_init__(self) -> None:
        for step in self.steps:
            if step not in ("none", "random", *TRIM_STEPS):
                raise ValueError(f"unknown sparsification {step!r}")
        draws = (self.n + 3) // 4 if 0 < _keep_of(self.drop_rate) < 65536 else 0
        self.offsets = {j: draws * i for i, j in enumerate(j for j, s in enumerate(self.steps) if s == "random")}

    @property
    def ranked(self) -> list[int]:
        """The steps that rank the tensor's magnitudes."""
        return [j for j, s in enumerate(self.steps) if s in TRIM_STEPS]

    def ranks(self, j: int) -> tuple[int, int] | None:
        """The ranks of trim step ``j`` in this tensor (``trim_scope: tensor``; None: it keeps everything)."""
        return trim_ranks(self.steps[j], self.n, self.density, self.gamma)

    def needs_tensor(self) -> bool:
        """Whether :meth:`resolve` must read the whole tensor."""
        if self.trim is not None:
            return self.trim.needs_keys()
        return any((r := self.ranks(j)) is not None and r[0] > 0 for j in self.ranked)

    def streams(self, start: int) -> dict[int, np.random.PCG64]:
        """Each random step's stream, moved to entry ``start`` (a multiple of 4)."""
        out = {}
        for j, offset in self.offsets.items():
            g = copy.deepcopy(self.generator)
            if g is not None:
                g.advance(offset + start // 4)
            out[j] = g
        return out  # type: ignore[return-value]

    def resolve(self, x: Tensor, base: Tensor | None) -> None:
        """Decide each trim on this tensor: ``x`` (flat) minus ``base`` (flat, or None: ``x`` is the task
        vector) with the steps before the trim, ranked whole. Magnitude keys are written piece by piece into
        this thread's workspace and partitioned there. With the ``first`` tie rule, tied entries are located
        in index order in a copy of the keys, written while each piece is in cache (a second workspace of n
        keys: scanning it costs a fraction of making the keys again); a model-wide trim, which has no keys of
        its own, makes them again piece by piece up to the last tie kept."""
        keys_t = workspace(self.n, torch.int32, "keys") if self.n else torch.empty(0, dtype=torch.int32)
        for j in self.ranked:
            if self.trim is not None and not self.trim.needs_keys():
                self.trims[j] = self.trim.on(None, self.n)
                continue
            ranks = self.ranks(j) if self.trim is None else (1, 0)
            if ranks is None or ranks[0] <= 0:
                self.trims[j] = None if ranks is None else TensorTrim(None)
                continue
            if self.trim is not None:
                self.trims[j] = self.trim.on(self._finder(j, x, base), self.n)
                continue
            copy_t = workspace(self.n, torch.int32, "keys copy") if self.rule == "first" and self.n else None
            for _ in self._keys(j, x, base, keys_t, copy_t):
                pass
            # the rule "all" never locates a tie (its edges take every tied entry, or none)
            find = scan_finder(copy_t.numpy()) if copy_t is not None else self._finder(j, x, base)
            self.trims[j] = tensor_trim(keys_t.numpy(), self.steps[j], self.density, self.gamma, self.rule, find)

    def _keys(self, j: int, x: Tensor, base: Tensor | None, out: Tensor | None = None, copy: Tensor | None = None
              ) -> Iterator[tuple[int, Tensor]]:
        """The magnitude keys of the task vector before step ``j``, piece by piece in order: written into
        ``out`` (all n; and into ``copy`` too, if given), or into a reused buffer (read each piece before the
        next)."""
        gens = self.streams(0)
        step = min(PIECE, max(self.n, 1))
        dtype = x.dtype if base is None else base.dtype
        # float32 task vectors are made in the keys' own memory (same size), their keys then written over them
        direct = out is not None and dtype == torch.float32
        work = out.view(dtype) if direct else workspace(step, dtype, "piece")  # type: ignore[union-attr]
        keys = workspace(step, torch.int32, "piece keys") if out is None else None
        for s in range(0, self.n, step):
            c = work[s:s + step] if direct else work[:min(step, self.n - s)]
            if base is None:
                c.copy_(x[s:s + step])
            else:
                _difference(x[s:s + step], base[s:s + step], c)
            self.apply(c, s, gens, upto=j)
            piece = magnitude_keys(c, out=keys[:len(c)] if out is None else out[s:s + len(c)])
            if copy is not None:
                copy[s:s + len(c)].copy_(piece)
            yield s, piece

    def _finder(self, j: int, x: Tensor, base: Tensor | None) -> Finder:
        """A :data:`Finder` over the keys of :meth:`_keys`, made again on each call."""

        def find(key: int, left: int) -> tuple[int, int]:
            seen = 0
            eq = np.empty(min(PIECE, self.n), dtype=bool)  # reused: a fresh temporary per piece costs page faults
            for s, piece in self._keys(j, x, base):
                equal = np.equal(piece.numpy(), key, out=eq[:len(piece)])
                c = int(np.count_nonzero(equal))
                if seen + c >= left:
                    return s + _nth_true(equal, left - seen) + 1, left
                seen += c
            return self.n, seen

        return find

    def apply(self, c: Tensor, start: int, gens: dict[int, np.random.PCG64], upto: int | None = None) -> None:
        """Sparsify the piece ``c`` (entries ``start``, ``start + 1``, ... of the task vector) in place with the
        steps before ``upto`` (default all); ``gens``: :meth:`streams` at ``start``, advanced by the pieces
        before this one."""
        for j, step in enumerate(self.steps[:upto]):
            if step == "random":
                random_drop(c, self.drop_rate, gens[j], rescale=self.rescale, inplace=True)
            elif step in TRIM_STEPS:
                trim = self.trims[j]
                if trim is not None:
                    trim.apply(c, start, workspace(3 * len(c), torch.int32, "trim"))


@dataclass(frozen=True)
class _Rows:
    """A K x m block as a tensor and as a numpy array (for the masks), with the tensor's rows: views made once
    per worker (a view costs microseconds, as much as a kernel call on a small block)."""

    t: Tensor
    a: np.ndarray
    rows_t: tuple[Tensor, ...]

    @classmethod
    def of(cls, t: Tensor) -> _Rows:
        return cls(t, t.numpy(), t.unbind(0))


def _sparsify_rows(taus: _Rows, models: Sequence[Sparsify], start: int,
                   gens: Sequence[dict[int, np.random.PCG64]]) -> None:
    """:meth:`Sparsify.apply` on a block of every model's task vector (the rows of ``taus``, K x m, models
    with the same steps), with the DARE masks of models that share a drop rate made by a few kernels over the
    whole block instead of a few per model."""
    m = taus.a.shape[1]
    for j, step in enumerate(models[0].steps):
        if step == "random":
            keeps = {_keep_of(sp.drop_rate) for sp in models}
            keep = keeps.pop()
            if not keeps and 0 < keep < 65536 and m:
                _drop_rows(taus, keep, [g[j] for g in gens], models[0].rescale)
            else:
                for i, sp in enumerate(models):
                    random_drop(taus.rows_t[i], sp.drop_rate, gens[i][j], rescale=sp.rescale, inplace=True)
        elif step in TRIM_STEPS:
            trims = [sp.trims[j] for sp in models]
            if any(t is not None and t.drop is not None for t in trims):
                _band_rows(taus, trims, start)
                continue
            ws = workspace(3 * m, torch.int32, "trim")
            for row, trim in zip(taus.rows_t, trims, strict=True):
                if trim is not None:
                    trim.apply(row, start, ws)


def _band_rows(taus: _Rows, trims: Sequence[TensorTrim | None], start: int) -> None:
    """:meth:`TensorTrim.apply` on every row of ``taus`` (K x m, at position ``start``) with a few kernels
    over the whole block: each row keeps the entries whose magnitude key k lies in its band [lo, lo + width),
    one unsigned comparison ``(k - lo) mod 2^32 < width``; a row whose edge cuts its tied entries inside the
    block is corrected on the part past (keep) or before (drop) the cut, by the keys the entries had before
    any mask (as the band's own mask, applied last)."""
    k, m = taus.a.shape
    keys = workspace(k * m, torch.int32, "band").view(k, m).numpy().view(np.uint32)
    inside = workspace(k * m, torch.bool, "band inside").view(k, m).numpy()
    lo, width, fixes = [], [], []
    for i, t in enumerate(trims):
        if t is None:  # keeps everything
            lo.append(0)
            width.append(MAX_KEY + 1)
            continue
        if t.keep is None:  # keeps nothing
            lo.append(0)
            width.append(0)
            continue
        # keep: ties before the cut are in, so a cut inside the block keeps them here and fixes the rest after
        keep = t.keep.key if t.keep.index > start else t.keep.key + 1
        if start < t.keep.index < start + m:
            fixes.append((i, t.keep.index - start, m, t.keep.key + 1, False))
        drop = MAX_KEY + 1
        if t.drop is not None:
            # drop: ties before the cut are dropped; a cut inside the block drops only the larger keys here
            drop = t.drop.key if t.drop.index >= start + m else t.drop.key + 1
            if start < t.drop.index < start + m:
                fixes.append((i, 0, t.drop.index - start, t.drop.key, True))
        lo.append(keep)
        width.append(max(0, drop - keep))
    if taus.a.dtype == np.float32:
        np.bitwise_and(taus.a.view(np.int32), MAX_KEY, out=keys.view(np.int32))
    else:
        magnitude_keys(taus.t, out=torch.from_numpy(keys.view(np.int32)))
    np.subtract(keys, np.array(lo, dtype=np.uint32)[:, None], out=keys)  # wraps below lo: then >= 2^31 >= width
    np.less(keys, np.array(width, dtype=np.uint32)[:, None], out=inside)
    for i, a, b, key, dropping in fixes:  # by the keys before any mask (masks commute: each zeroes an entry)
        at_least = np.greater_equal(keys[i, a:b] + np.uint32(lo[i]), key)  # the keys again: (k - lo) + lo
        kept = np.logical_not(at_least) if dropping else at_least
        _and_mask(taus.rows_t[i][a:b], torch.from_numpy(kept).to(torch.int32).neg_())
    _keep_rows(taus, inside)


def _drop_rows(taus: _Rows, keep: int, gens: Sequence[np.random.PCG64], rescale: bool) -> None:
    """:func:`random_drop` of each row of ``taus`` (K x m, each row with its own stream, all with the same
    ``keep``), in place."""
    k, m = taus.a.shape
    q = (m + 3) // 4
    raw = workspace(k * q, torch.int64, "draws").view(k, q).numpy().view(np.uint64)
    for i, g in enumerate(gens):
        raw[i] = g.random_raw(q)
    kept = workspace(k * m, torch.bool, "kept").view(k, m).numpy()
    np.less(raw.view(np.uint16)[:, :m], keep, out=kept)  # as random_drop: kept where u < keep
    _keep_rows(taus, kept)
    if rescale:
        taus.t.mul_(65536 / keep)


def _keep_rows(taus: _Rows, kept: np.ndarray) -> None:
    """:func:`_and_mask` of the block ``taus`` by the boolean ``kept`` (K x m): float32 entries are multiplied
    as int32 bit patterns by 1 or 0 (the entry or +0, as the AND with -1 or 0, one pass); other dtypes go
    through :func:`_and_mask` itself."""
    if taus.a.dtype == np.float32:
        bits = taus.a.view(np.int32)
        np.multiply(bits, kept, out=bits)
    else:
        _and_mask(taus.t, torch.from_numpy(kept).to(torch.int32).neg_())


def _resolve(models: Sequence[Sparsify], xs: Sequence[Tensor], base: Tensor) -> None:
    """Decide every model's trims on this tensor (phase one of :func:`generalized_task_arithmetic`), the
    models side by side on the worker threads when their whole tensors must be read."""
    if not models[0].ranked:
        return
    if len(models) > 1 and models[0].n >= PARALLEL_MIN and any(sp.needs_tensor() for sp in models):
        parallel(lambda i: models[i].resolve(xs[i], base), len(models))
    else:
        for sp, x in zip(models, xs, strict=True):
            sp.resolve(x, base)

def sparsify(tau: Tensor, steps: Sequence[str], *, density: float = 1.0, drop_rate: float = 0.0,
             gamma: float = 0.0, generator: np.random.PCG64 | None = None, rescale: bool = True,
             tie_rule: str = "first", trim: Trim | None = None) -> Tensor:
    """Apply the sparsification ``steps`` (see :class:`Sparsify`) to the task vector ``tau``, in place."""
    flat = tau.view(-1)
    sp = Sparsify(list(steps), flat.numel(), density, drop_rate, gamma, generator, rescale, tie_rule, trim)
    sp.resolve(flat, None)
    gens = sp.streams(0)
    for s in range(0, flat.numel(), CHUNK):
        sp.apply(flat[s:s + CHUNK], s, gens)
    return tau


def task_vector(base: Tensor, t: Tensor, steps: Sequence[str], *, density: float = 1.0, drop_rate: float = 0.0,
                gamma: float = 0.0, generator: np.random.PCG64 | None = None, rescale: bool = True,
                tie_rule: str = "first", trim: Trim | None = None, consume: bool = False) -> Tensor:
    """``sparsify(t - base)`` for one model in ``base``'s dtype (``t`` may be stored in another, e.g. bfloat16:
    the difference is taken as if it had been converted first); see :class:`Sparsify` for the steps."""
    tau = t.sub_(base) if consume and t.dtype == base.dtype and t.is_contiguous() else torch.sub(t, base)
    return sparsify(tau, steps, density=density, drop_rate=drop_rate, gamma=gamma, generator=generator,
                    rescale=rescale, tie_rule=tie_rule, trim=trim)


@dataclass(frozen=True)
class _Combine:
    """How the task vectors of one tensor are combined: ``base += lam * combine(taus)`` (see
    :func:`generalized_task_arithmetic`), with what each block needs precomputed."""

    weights: tuple[float, ...]
    consensus: bool
    normalize: bool
    lam: float
    count: Tensor | None = None  # divisor by count: entry c is the sum of c equal weights (None: unequal)
    scale: float | None = None  # ... and the count times this weight gives it exactly (None: look it up)

    @classmethod
    def of(cls, weights: Sequence[float], consensus: bool, normalize: bool, lam: float, dtype: torch.dtype
           ) -> _Combine:
        w = tuple(float(x) for x in weights)
        count, scale = None, None
        if consensus and normalize and len(set(w)) == 1:
            # the divisor sums the weights of the agreeing models in model order; with one weight w it is a
            # function of how many agree: c -> w + w + ... (c times, rounded as the sum is), often exactly c * w
            count = torch.zeros(len(w) + 1, dtype=dtype)
            for c in range(1, len(w) + 1):
                count[c] = count[c - 1] + w[0]
            exact = torch.equal(count, torch.arange(len(w) + 1, dtype=dtype) * w[0])
            scale = w[0] if exact else None
        return cls(w, consensus, normalize, lam, count, scale)


def _combine_block(base: Tensor, taus: Tensor, plan: _Combine, work: Tensor,
                   views: tuple[_Rows, _Rows] | None = None) -> None:
    """Merge one block in place: ``base += lam * combine(taus)`` for ``taus`` (K x m, the block of each model's
    weighted task vector, overwritten), where combine is their sum, divided by the summed weights if
    ``normalize``; with ``consensus`` only the entries that agree with the elected sign count (the disjoint
    mean of TIES). Sums run over the models in order, as mergekit's ``sum(dim=0)`` over stacked tensors.
    ``work``: 4 x m scratch; ``views``: ``taus`` and ``work`` with their rows (made when not given)."""
    t, w = views if views is not None else (_Rows.of(taus), _Rows.of(work))
    if not plan.consensus:
        mixed = t.rows_t[0]
        for row in t.rows_t[1:]:
            mixed += row
        total_w = float(sum(plan.weights))
        if plan.normalize and abs(total_w) >= 1e-8:
            mixed /= total_w
        if plan.lam != 1:
            mixed *= plan.lam
        base += mixed
        return
    # Sign election with every entry turned positive: x_k = t_k * sgn > 0 exactly where t_k agrees with the
    # elected sign sgn (+1 where the sum is >= 0); the sum of the agreeing entries is sgn * sum_k max(x_k, 0),
    # bit for bit the sum of the agreeing t_k (multiplying by +-1 and adding zeros are exact).
    total, sgn, mixed, divisor = w.rows_t
    _sum_rows(t.rows_t, total)
    torch.copysign(sgn.fill_(1), total, out=sgn)
    taus.mul_(sgn).clamp_(min=0)
    _sum_rows(t.rows_t, mixed)
    if plan.normalize:
        ws = plan.weights
        taus.sign_()  # 1 where the model agrees, else 0
        if plan.count is not None:
            torch.sum(taus, 0, out=divisor)  # small integers: exact in any order
            if plan.scale is None:
                torch.take(plan.count, divisor.long(), out=divisor)  # type: ignore[call-overload]
            elif plan.scale != 1:
                divisor *= plan.scale
        else:
            torch.mul(t.rows_t[0], ws[0], out=divisor)
            for i in range(1, len(ws)):
                divisor.add_(t.rows_t[i], alpha=ws[i])
        if min(ws) > 0:  # a zero divisor has a zero sum over it; any positive stand-in gives 0 there
            divisor.clamp_(min=min(ws))
        else:
            divisor += divisor == 0
        mixed /= divisor
    mixed *= sgn
    if plan.lam != 1:
        mixed *= plan.lam
    base += mixed


def _sum_rows(rows: Sequence[Tensor], out: Tensor) -> None:
    """``out = rows[0] + rows[1] + ...``, added in order."""
    if len(rows) == 1:
        out.copy_(rows[0])
        return
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out += row


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether ``src`` converts to ``dst`` exactly and is what ``torch.sub`` of the two computes in (``src``
    narrower or the same)."""
    return torch.promote_types(src, dst) == dst


def _difference(x: Tensor, base: Tensor, out: Tensor) -> Tensor:
    """``out = x - base`` in ``out``'s dtype (``base``'s). A narrower ``x`` (bfloat16) is widened into ``out`` and
    the base subtracted in place: the values ``torch.sub`` gives (it widens exactly too), without the temporary
    it allocates for the widened copy (a fresh buffer costs page faults)."""
    if x.dtype != out.dtype and _widens(x.dtype, out.dtype):
        return out.copy_(x).sub_(base)
    return torch.sub(x, base, out=out)


def _differences(xs: Sequence[Tensor], base: Tensor, taus: _Rows) -> None:
    """``taus[i] = xs[i] - base`` for a block (``taus``: K x m): rows widened one by one, then one subtraction
    of the base from every row (see :func:`_difference`)."""
    if all(x.dtype != taus.t.dtype and _widens(x.dtype, taus.t.dtype) for x in xs):
        for row, x in zip(taus.rows_t, xs, strict=True):
            row.copy_(x)
        taus.t.sub_(base)
        return
    for row, x in zip(taus.rows_t, xs, strict=True):
        _difference(x, base, row)


def _combine(out: Tensor, xs: Sequence[Tensor], models: Sequence[Sparsify], plan: _Combine) -> None:
    """``out += lam * combine(sparsify_k(x_k - out) * w_k)`` block by block (``out`` is the base), the blocks
    split between the worker threads; each block of every model's task vector is made in cache and combined."""
    n = out.numel()
    k = len(xs)
    if n == 0:
        return
    step = min(BLOCK, n)
    bounds = _ranges(n)
    sparse = any(s != "none" for s in models[0].steps)
    weights = None if all(w == 1 for w in plan.weights) else torch.tensor(plan.weights, dtype=out.dtype)[:, None]

    def run(p: int) -> None:
        lo, hi = bounds[p], bounds[p + 1]
        gens = [m.streams(lo) for m in models]
        work = workspace((k + 4) * step, out.dtype, "combine")
        stack, scratch = work[:k * step].view(k, step), work[k * step:].view(4, step)
        # the views of every block made in a few calls up front (a view costs as much as a kernel on a block)
        pieces = [x[lo:hi].split(step) for x in xs]
        full = (_Rows.of(stack), _Rows.of(scratch))
        for b, block in enumerate(out[lo:hi].split(step)):
            m = len(block)
            taus, w = full if m == step else (_Rows.of(stack[:, :m]), _Rows.of(scratch[:, :m]))
            start = lo + b * step
            _differences([piece[b] for piece in pieces], block, taus)
            if sparse:
                _sparsify_rows(taus, models, start, gens)
            if weights is not None:
                taus.t.mul_(weights)
            _combine_block(block, taus.t, plan, w.t, (taus, w))

    parallel(run, len(bounds) - 1)


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sparsify: str | Sequence[str] = "none",
    density: Sequence[float] | None = None,
    drop_rate: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    generators: Sequence[np.random.PCG64] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    rescale: bool = True,
    tie_rule: str = "first",
    trims: Sequence[Trim | None] | None = None,
    consume: bool = False,
) -> Tensor:
    """``base + lam * combine(weight_k * sparsify(theta_k - base))`` for one tensor, computed in ``base``'s
    dtype (the models may be stored in another floating dtype, e.g. bfloat16: they are read as if converted).

    ``sparsify``: one step or a sequence of steps applied in order (see :class:`Sparsify`), with per-model
    ``density``, ``drop_rate``, ``gamma`` and ``generators``; ``tie_rule`` resolves ties at a trim threshold
    (see :func:`magnitude_prune`); ``trims``: per model, a trim decided over the whole model (model scope).
    ``consensus``: keep only entries whose sign agrees with the elected sign (TIES). ``normalize``: divide
    by the summed weights (of the agreeing entries, with consensus) - the disjoint mean.
    With ``consume`` the function may overwrite ``base`` (the streaming merge owns it); ``tensors`` are only read.

    The work runs on :data:`WORKERS` threads in two phases: a trim first ranks each model's whole task vector
    (the models side by side; only the magnitude keys are stored), then the tensor is merged block by block
    (:data:`BLOCK` entries; the blocks side by side): each model's difference from the base, its
    sparsification and weight, and the combine, all while the block is in cache, so no task vector is ever
    stored whole. Every sum runs over the models in order: the result does not depend on the threads or blocks.
    """
    k = len(tensors)
    out = own(base, consume)
    if k == 0:
        return out
    steps = [sparsify] if isinstance(sparsify, str) else list(sparsify)
    flat = out.view(-1)
    n = flat.numel()
    xs = [t.reshape(-1) for t in tensors]
    models = [Sparsify(steps, n, density[i] if density else 1.0, drop_rate[i] if drop_rate else 0.0,
                       gamma[i] if gamma else 0.0, generators[i] if generators else None, rescale, tie_rule,
                       trims[i] if trims else None) for i in range(k)]
    _resolve(models, xs, flat)
    _combine(flat, xs, models, _Combine.of(weights, consensus, normalize, lam, flat.dtype))
    return out


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float], *, consume: bool = False,
                     dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """Weight averaging (Wortsman et al. 2022, "Model soups"): ``sum_k w_k theta_k / sum_k w_k``, computed in
    ``dtype`` (default: the first tensor's; the others are read in it), block by block on the worker
    threads; ``out``: a contiguous tensor of that dtype and shape to write it to (else a new one, or the first
    tensor itself when handed over with ``consume`` and already of that dtype)."""
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise ValueError("the model weights sum to zero")
    first = tensors[0]
    dtype = dtype or first.dtype
    if out is None:
        same = first.dtype == dtype and consume and first.is_contiguous()
        out = first if same else torch.empty(first.shape, dtype=dtype)
    flat, xs = out.view(-1), [t.reshape(-1) for t in tensors]
    bounds = _ranges(flat.numel())

    def run(p: int) -> None:
        for s in range(bounds[p], bounds[p + 1], BLOCK):
            o = flat[s:s + BLOCK]
            if o.data_ptr() != xs[0][s:s + BLOCK].data_ptr():
                o.copy_(xs[0][s:s + BLOCK])
            if weights[0] != 1:
                o *= weights[0]
            for x, w in zip(xs[1:], weights[1:], strict=True):
                o.add_(x[s:s + BLOCK], alpha=w)
            o.div_(total)

    parallel(run, len(bounds) - 1)
    return out


def _ranges(n: int) -> list[int]:
    """Bounds of the ranges the worker threads take of ``n`` entries, at multiples of :data:`BLOCK` (one
    range below :data:`PARALLEL_MIN`)."""
    step = max(1, min(BLOCK, n))
    parts = max(1, min(_workers(), -(-n // step))) if n >= PARALLEL_MIN else 1
    return [min(n, -(-n * p // parts // step) * step) for p in range(parts + 1)]


def squared_norm(t: Tensor) -> float:
    """``||t||^2`` in float64 (for coefficients computed from norms)."""
    return float(t.double().pow(2).sum()) if t.numel() else 0.0
