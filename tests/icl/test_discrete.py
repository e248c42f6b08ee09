"""Token tasks: the prompt layout, determinism, and every task's answers (successor, copy, reverse, the cipher,
bijective or not, and the fixed lookup table)."""

from dataclasses import replace

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
    base_inverse,
    build_token_task,
    decipher,
    scramble,
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


def plain_and_shown(task: Cipher, p: TokenPrompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain inputs, shown inputs) of every demonstration and the query, B x (n+1) x length (0-based): the plain
    inputs are the outputs through the inverse base task."""
    shown, ys = pairs(p, task.length, task.length)
    return base_inverse(task.base, ys, task.alphabet), shown


def test_substitution_shuffles_a_rate_of_the_alphabet_and_keeps_the_rest():
    pi = substitution(gen(3), 200, 12, rate=0.5)
    assert all(sorted(row.tolist()) == list(range(12)) for row in pi)  # a permutation
    moved = (pi != torch.arange(12)).sum(dim=1)
    assert int(moved.max()) <= 6 and float(moved.float().mean()) > 4  # 6 shuffled; a few land on themselves
    assert torch.equal(substitution(gen(3), 4, 12, rate=0.0), torch.arange(12).repeat(4, 1))
    assert not torch.equal(pi[0], pi[1])  # a fresh cipher per row


cipher_cases = dict(alphabet=st.integers(2, 12), length=st.integers(1, 4), n=st.integers(1, 6),
                    base=st.sampled_from(["copy", "successor", "reverse"]), bijective=st.booleans(),
                    per_prompt=st.booleans(), rate=st.sampled_from([0.3, 0.7, 1.0]), seed=st.integers(0, 2**31))


@settings(max_examples=40, deadline=None)
@given(**cipher_cases)
def test_priority_sampling_puts_every_query_symbol_in_the_demonstrations(alphabet, length, n, base, bijective,
                                                                         per_prompt, rate, seed):
    task = Cipher(alphabet=alphabet, length=length, base=base, bijective=bijective, per_prompt=per_prompt, rate=rate)
    plain, shown = plain_and_shown(task, task.sample(gen(seed), 8, n))
    for b in range(8):
        demos = set(plain[b, :-1].flatten().tolist())
        assert set(plain[b, -1].tolist()) <= demos  # Fang et al.'s priority sampling, plain symbols
        if bijective:  # a bijection shows equal plain symbols equally: the shown query symbols recur too
            assert set(shown[b, -1].tolist()) <= set(shown[b, :-1].flatten().tolist())


@settings(max_examples=40, deadline=None)
@given(**cipher_cases)
def test_bijective_cipher_is_invertible_from_the_prompt_alone(alphabet, length, n, base, bijective, per_prompt,
                                                              rate, seed):
    task = Cipher(alphabet=alphabet, length=length, base=base, per_prompt=per_prompt, rate=rate)
    p = task.sample(gen(seed), 8, n)
    plain, shown = plain_and_shown(task, p)
    for b in range(8):  # one shown symbol per plain symbol and back: a bijection read off the prompt
        seen = set(zip(shown[b].flatten().tolist(), plain[b].flatten().tolist(), strict=True))
        assert len({s for s, _ in seen}) == len({x for _, x in seen}) == len(seen)
    assert torch.equal(decipher(task, p), p.answers)  # so the prompt-only decoder answers every query


def test_non_bijective_cipher_is_not_invertible_from_the_prompt():
    task = Cipher(alphabet=8, length=3, bijective=False)
    p = task.sample(gen(4), 300, 6)
    plain, shown = plain_and_shown(task, p)
    one_to_many = many_to_one = 0
    for b in range(300):
        seen = set(zip(shown[b].flatten().tolist(), plain[b].flatten().tolist(), strict=True))
        one_to_many += len({x for _, x in seen}) < len(seen)  # a plain symbol shown two ways
        many_to_one += len({s for s, _ in seen}) < len(seen)  # a shown symbol standing for two plain ones
    assert one_to_many >= 290 and many_to_one >= 290
    # The prompt-only decoder is exact on the bijective version of the same prompts and far from it here (it is
    # right on the symbols the permutation keeps, about 1 in 8, and by chance among the shuffled ones).
    assert float((decipher(task, p) == p.answers).float().mean()) < 0.4
    bijective = replace(task, bijective=True)
    q = bijective.sample(gen(4), 300, 6)
    assert torch.equal(decipher(bijective, q), q.answers)


def test_non_bijective_cipher_scrambles_only_the_symbols_the_permutation_moves():
    pi = torch.tensor([[0, 2, 1, 3, 4, 6, 5]])  # moves 1, 2, 5, 6
    xs = torch.arange(7).repeat(1, 50)
    out = scramble(gen(1), pi, xs)
    keep = torch.isin(xs, torch.tensor([0, 3, 4]))
    assert torch.equal(out[keep], xs[keep])
    assert set(out[~keep].tolist()) == {1, 2, 5, 6}  # every moved symbol is drawn, independently per occurrence


def test_cipher_without_priority_keeps_distinct_single_symbol_inputs():
    task = Cipher(alphabet=10, priority=False, per_prompt=False, seed=7)
    plain, _ = plain_and_shown(task, task.sample(gen(2), 20, 9))
    assert all(len(set(row.flatten().tolist())) == 10 for row in plain)


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
