"""Token tasks: the prompt layout, determinism, and every task's answers (successor, copy, reverse, the cipher,
bijective or not, and the fixed lookup table)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.errors import ConfigError, DataError
from polytask.icl.discrete import (
    TOKEN_TASKS,
    Cipher,
    Copy,
    Lookup,
    Reverse,
    Successor,
    build_token_task,
    substitution,
)
from polytask.icl.prompts import ARROW, SEP, SYMBOLS, TokenPrompts


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pairs(p: TokenPrompts, lx: int, ly: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read back (inputs, outputs) of every demonstration and the query (0-based symbols), checking the reserved
    tokens on the way: B x (n+1) x lx and B x (n+1) x ly (the query's output is the answer)."""
    batch, length = p.tokens.shape
    width = lx + ly + 2
    n = (length - lx - 1) // width
    assert length == n * width + lx + 1
    demos = p.tokens[:, :n * width].reshape(batch, n, width)
    assert (demos[:, :, lx] == ARROW).all() and (demos[:, :, -1] == SEP).all()
    assert (p.tokens[:, -1] == ARROW).all() and (p.query == length - 1).all()
    xs = torch.cat([demos[:, :, :lx], p.tokens[:, None, n * width:n * width + lx]], 1) - SYMBOLS
    ys = torch.cat([demos[:, :, lx + 1:lx + 1 + ly], p.answers[:, None]], 1) - SYMBOLS
    return xs, ys


def test_every_task_is_registered():
    assert TOKEN_TASKS.names() == ["cipher", "copy", "lookup", "reverse", "successor"]


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(TOKEN_TASKS.names()), batch=st.integers(1, 4), n=st.integers(0, 6),
       seed=st.integers(0, 2**31))
def test_shapes_determinism_and_vocabulary(name, batch, n, seed):
    task = build_token_task(name, {})
    a, b = task.sample(gen(seed), batch, n), task.sample(gen(seed), batch, n)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answers, b.answers)
    assert a.tokens.dtype == a.answers.dtype == torch.long and a.query.shape == (batch,)
    length = getattr(task, "length", 1)
    xs, ys = pairs(a, length, length)
    assert xs.shape == (batch, n + 1, length) and ys.shape == (batch, n + 1, length)
    assert a.tokens.min() >= 0 and a.tokens.max() < task.vocab_size and a.answers.max() < task.vocab_size


@settings(max_examples=10, deadline=None)
@given(alphabet=st.integers(8, 30), seed=st.integers(0, 2**31))
def test_successor_answers_the_next_symbol_and_never_repeats_the_query(alphabet, seed):
    p = Successor(alphabet=alphabet).sample(gen(seed), 5, 7)
    xs, ys = pairs(p, 1, 1)
    assert torch.equal(ys, (xs + 1) % alphabet)
    for row in xs[:, :, 0]:
        assert len(set(row.tolist())) == 8  # distinct inputs within a prompt
    assert p.answers.shape == (5, 1)


def test_successor_wraps_around():
    p = Successor(alphabet=3).sample(gen(1), 20, 2)
    xs, ys = pairs(p, 1, 1)
    assert ys[xs == 2].eq(0).all() and (xs == 2).any()


def test_copy_and_reverse_answers():
    xs, ys = pairs(Copy(alphabet=9, length=4).sample(gen(2), 3, 5), 4, 4)
    assert torch.equal(xs, ys)
    xs, ys = pairs(Reverse(alphabet=9, length=4).sample(gen(2), 3, 5), 4, 4)
    assert torch.equal(ys, xs.flip(-1)) and not torch.equal(xs, ys)
    assert Copy(alphabet=9, length=2).sample(gen(), 2, 1).answers.shape == (2, 2)


def test_bijective_cipher_is_a_permutation_per_prompt_and_decodes_to_the_base_answer():
    task = Cipher(alphabet=12, length=2, base="successor")
    p = task.sample(gen(3), 6, 10)
    shown, ys = pairs(p, 2, 2)
    # Replay the draws: inputs first, then the substitution (Cipher.shown), so the plain inputs are recoverable.
    g = gen(3)
    plain = torch.randint(0, 12, (6, 11, 2), generator=g)
    pi = substitution(g, 6, 12, True)
    assert torch.equal(shown, pi.gather(1, plain.reshape(6, -1)).reshape(plain.shape))
    assert torch.equal(ys, (plain + 1) % 12)
    assert all(sorted(row.tolist()) == list(range(12)) for row in pi)
    assert not torch.equal(pi[0], pi[1])  # a fresh cipher per prompt


def test_non_bijective_cipher_is_two_to_one_so_the_prompt_is_ambiguous():
    pi = substitution(gen(4), 50, 10, False)
    for row in pi:
        counts = torch.bincount(row, minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [2] * 5
    # Deciphering (base copy) through a two-to-one map: two different answers follow the same shown symbol.
    task = Cipher(alphabet=6, bijective=False, per_prompt=False, seed=5)
    shown, ys = pairs(task.sample(gen(5), 30, 5), 1, 1)
    seen: dict[int, set[int]] = {}
    for s, y in zip(shown.flatten().tolist(), ys.flatten().tolist(), strict=True):
        seen.setdefault(s, set()).add(y)
    assert max(len(v) for v in seen.values()) == 2 and len(seen) == 3


def test_fixed_cipher_is_the_same_in_every_prompt_and_call():
    task = Cipher(alphabet=10, per_prompt=False, seed=7)
    a, b = task.sample(gen(0), 8, 9), task.sample(gen(1), 8, 9)
    mapping: dict[int, int] = {}
    for p in (a, b):
        shown, ys = pairs(p, 1, 1)
        for s, y in zip(shown.flatten().tolist(), ys.flatten().tolist(), strict=True):
            assert mapping.setdefault(y, s) == s  # base copy: the plain symbol y is always shown as s
    assert sorted(mapping.values()) == sorted(set(mapping.values()))  # injective


def test_lookup_table_is_fixed_and_pairs_keys_with_values():
    task = Lookup(pairs=20, seed=3)
    a, b = task.sample(gen(0), 5, 6), task.sample(gen(9), 5, 6)
    table = task.table()
    assert sorted(table.tolist()) == list(range(20, 40))
    for p in (a, b):
        keys, values = pairs(p, 1, 1)
        assert (keys < 20).all() and torch.equal(values, table[keys])
    assert task.vocab_size == SYMBOLS + 40
    assert not torch.equal(table, Lookup(pairs=20, seed=4).table())


def test_too_many_examples_for_distinct_inputs_is_a_data_error_naming_the_task():
    with pytest.raises(DataError, match=r"successor.*alphabet of at least 6"):
        Successor(alphabet=5).sample(gen(), 1, 5)


def test_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match=r"task\.params\.base"):
        build_token_task("cipher", {"base": "sort"}, where="task.params")
    with pytest.raises(ConfigError, match="did you mean 'successor'"):
        build_token_task("sucessor")
