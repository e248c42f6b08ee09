"""The one-pass trim of a tensor by a sampled key range (ops.bracket_trim) against ranking the whole tensor:
the same thresholds and tie edges, a clean fallback when the range misses, and the pinned merge bytes with
every trim taking the one-pass path."""

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.merging import ops

_spec = importlib.util.spec_from_file_location("merge_bits_cases", Path(__file__).with_name("test_merge_bits.py"))
_bits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bits)
CASES, GOLDEN, run_all = _bits.CASES, _bits.GOLDEN, _bits.run_all


def whole(x, base, kind, density, gamma, rule):
    """The trim found by ranking every key of ``x - base`` (the path before the one-pass trim)."""
    sp = ops.Sparsify([kind], x.numel(), density, 0.0, gamma, None, True, rule, None)
    old = ops.BRACKET_MIN
    ops.BRACKET_MIN = 1 << 62
    try:
        sp.resolve(x, base)
    finally:
        ops.BRACKET_MIN = old
    return sp.trims[0]


def task(n, seed, grid, zeros, nonfinite=False):
    """A bfloat16 model and a float32 base: a smooth task vector (``grid``: on a coarse grid, many ties;
    ``zeros``: that fraction of entries equal to the base; ``nonfinite``: a few NaN and inf entries)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16().float()
    tau = torch.randn(n, generator=g) * 0.02
    if grid:
        tau = torch.round(tau * 200) / 200
    x = (base + tau).bfloat16()
    x[: int(zeros * n)] = base[: int(zeros * n)].bfloat16()
    if nonfinite:
        x[7::97] = float("inf")
        x[11::89] = float("-inf")
        x[5::53] = float("nan")
    return x, base


@settings(max_examples=40, deadline=None)
@given(st.integers(2000, 40000), st.integers(0, 10**6), st.booleans(), st.sampled_from([0.0, 0.1, 0.6]),
       st.sampled_from(["magnitude", "band"]), st.sampled_from(["first", "all"]), st.floats(0.001, 0.999),
       st.floats(0.0, 0.2), st.sampled_from([64, 1000, 1 << 18]), st.booleans())
def test_one_pass_trim_is_the_whole_ranking(n, seed, grid, zeros, kind, rule, density, gamma, piece, nonfinite):
    x, base = task(n, seed, grid, zeros, nonfinite)
    ranks = ops.trim_ranks(kind, n, density, gamma)
    old = ops.PIECE
    ops.PIECE = piece
    try:
        got = ops.bracket_trim(x, base, kind, ranks, rule) if ranks and ranks[0] > 0 else None
        want = whole(x, base, kind, density, gamma, rule)
    finally:
        ops.PIECE = old
    assert got is None or got == want
    if zeros == 0.0 and not grid and ranks and ranks[0] > 0:  # a smooth task vector: the one pass decides it
        assert got is not None


def test_a_range_that_misses_its_rank_falls_back_to_the_whole_ranking(monkeypatch):
    x, base = task(100_000, 3, False, 0.0)
    ranks = ops.trim_ranks("magnitude", x.numel(), 0.2)
    want = whole(x, base, "magnitude", 0.2, 0.0, "first")
    keys = ops.magnitude_keys(x.float() - base)
    top = int(keys.max())
    monkeypatch.setattr(ops, "brackets", lambda sample, n, ranks: [(top - 5, top)] * len(ranks))  # far above
    assert ops.bracket_trim(x, base, "magnitude", ranks, "first") is None
    monkeypatch.setattr(ops, "BRACKET_MIN", 1)
    sp = ops.Sparsify(["magnitude"], x.numel(), 0.2, rule="first")
    sp.resolve(x, base)
    assert sp.trims[0] == want


def test_ties_holding_most_entries_fall_back_and_keep_exactly_k():
    x, base = task(80_000, 5, True, 0.9)  # 90 % of the task vector is zero: the threshold is a zero
    ranks = ops.trim_ranks("magnitude", x.numel(), 0.5)
    assert ops.bracket_trim(x, base, "magnitude", ranks, "first") is None
    out = ops.generalized_task_arithmetic(base, [x], [1.0], sparsify="magnitude", density=[0.5])
    assert int((out != base).sum()) <= ranks[0]
    kept = ops.magnitude_prune(x.float() - base, 0.5)
    assert int((kept != 0).sum()) <= ranks[0] and torch.equal(out, base + kept)


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("case", [i for i, (m, p, _) in enumerate(CASES)
                                  if m in ("ties", "breadcrumbs", "generalized", "dare_ties")
                                  and p.get("trim_scope", "tensor") == "tensor"])
def test_pinned_merges_keep_their_bits_with_the_one_pass_trim(monkeypatch, case, compute):
    """The pinned bytes of every trimmed merge of test_merge_bits, with the one-pass trim taken for every
    tensor (the pinned tensors are smaller than BRACKET_MIN) and small samples."""
    monkeypatch.setattr(ops, "BRACKET_MIN", 1)
    monkeypatch.setattr(ops, "SAMPLE", 64)
    method, params, kind = CASES[case]
    assert "/".join(run_all(method, params, kind, compute, monkeypatch)) == GOLDEN[(case, compute)]
