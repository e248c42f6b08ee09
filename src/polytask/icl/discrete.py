"""Discrete token tasks for in-context learning and task vectors (Hendel et al. 2023, "In-context learning creates
task vectors", Findings of EMNLP; their ``core/data/tasks``), written in our own small vocabulary.

A prompt is ``x_1 ARROW y_1 SEP ... x_n ARROW y_n SEP x_q ARROW`` and the answer is y_q (the
:class:`polytask.icl.prompts.TokenPrompts` layout). A task over an alphabet of ``a`` symbols uses the token ids
``SYMBOLS .. SYMBOLS + a - 1``; ``vocab_size`` counts the reserved ids too. Inputs of one token are drawn without
replacement within a prompt (no demonstration repeats the query, as Hendel et al. draw distinct examples); inputs of
several tokens are drawn token by token (a repeat is then improbable, not excluded). The cipher with priority
sampling is the exception: its query's symbols are written into the demonstrations on purpose.

Tasks: successor (y = x + 1 mod a), copy (y = x), reverse (y = x reversed), a substitution cipher (the
reformulation of Fang et al. 2025, "ICL CIPHERS": the inputs of a base task are enciphered by a bijective
substitution or scrambled non-bijectively, per prompt or fixed, with every query symbol also in the demonstrations,
so a bijective cipher can be decoded in context while a non-bijective one cannot), and a fixed lookup table (a
country -> capital stand-in: the same random pairs in every prompt, so the answer is recalled rather than inferred).

Deliberate differences from Hendel et al.: symbols of a synthetic alphabet instead of words of a tokenizer, one
fixed separator token instead of their newline, and the answer's tokens given explicitly instead of decoded text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.errors import ConfigError, DataError
from polytask.icl.prompts import ARROW, SEP, SYMBOLS, TokenPrompts
from polytask.registry import Registry


def draw_inputs(generator: torch.Generator, batch: int, count: int, length: int, alphabet: int, task: str
                ) -> Tensor:
    """``batch`` x ``count`` x ``length`` symbols (0-based); single symbols are distinct within a prompt."""
    if length == 1:
        if count > alphabet:
            raise DataError(f"token task {task!r}: {count} distinct inputs (examples + query) need an alphabet of at "
                            f"least {count} symbols, got {alphabet}")
        return torch.rand(batch, alphabet, generator=generator).argsort(dim=1)[:, :count].unsqueeze(-1)
    return torch.randint(0, alphabet, (batch, count, length), generator=generator)


def layout(xs: Tensor, ys: Tensor) -> TokenPrompts:
    """The token prompts of symbols ``xs`` (B x (n+1) x lx) and ``ys`` (B x (n+1) x ly), 0-based: the first n pairs
    are demonstrations ``x ARROW y SEP``, the last is the query ``x ARROW`` and its answer y."""
    batch, count, _ = xs.shape
    arrow = torch.full((batch, count, 1), ARROW, dtype=torch.long)
    sep = torch.full((batch, count, 1), SEP, dtype=torch.long)
    demos = torch.cat([xs + SYMBOLS, arrow, ys + SYMBOLS, sep], dim=2)[:, :-1].reshape(batch, -1)
    tokens = torch.cat([demos, xs[:, -1] + SYMBOLS, arrow[:, -1]], dim=1)
    query = torch.full((batch,), tokens.shape[1] - 1, dtype=torch.long)
    return TokenPrompts(tokens, ys[:, -1] + SYMBOLS, query)


class SymbolTask:
    """A token task defined by a map on 0-based symbols (implements :class:`polytask.icl.prompts.TokenTask`)."""

    name: str = ""
    alphabet: int = 10
    length: int = 1

    @property
    def vocab_size(self) -> int:
        """Reserved ids plus the alphabet."""
        return SYMBOLS + self.alphabet

    def answer(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The outputs (B x count x ly) of inputs ``xs`` (B x count x lx); ``generator`` draws per-prompt state."""
        raise NotImplementedError

    def shown(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The inputs as the prompt writes them (the cipher enciphers them); the task's own inputs by default."""
        return xs

    def sample(self, generator: torch.Generator, batch: int, n_examples: int) -> TokenPrompts:
        """``batch`` prompts of ``n_examples`` demonstrations followed by one query."""
        if n_examples < 0:
            raise DataError(f"token task {self.name!r}: n_examples must be >= 0, got {n_examples}")
        xs = draw_inputs(generator, batch, n_examples + 1, self.length, self.alphabet, self.name)
        return layout(self.shown(generator, xs), self.answer(generator, xs))


@dataclass(frozen=True)
class Successor(SymbolTask):
    """y = x + 1 mod ``alphabet`` (one token each; Hendel et al.'s "next letter")."""

    alphabet: int = 26
    name: str = "successor"

    def answer(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The next symbol, wrapping around."""
        return (xs + 1) % self.alphabet


@dataclass(frozen=True)
class Copy(SymbolTask):
    """y = x, ``length`` tokens each (``length`` 1 is the single-token variant)."""

    alphabet: int = 26
    length: int = 3
    name: str = "copy"

    def answer(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The input itself."""
        return xs.clone()


@dataclass(frozen=True)
class Reverse(SymbolTask):
    """y = x reversed, ``length`` tokens each."""

    alphabet: int = 26
    length: int = 3
    name: str = "reverse"

    def answer(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The input's tokens in reverse order."""
        return xs.flip(-1)


def substitution(generator: torch.Generator, batch: int, alphabet: int, rate: float = 1.0) -> Tensor:
    """``batch`` bijective substitutions (B x alphabet, symbol -> symbol), Fang et al. 2025's ``shullfe_ids``: a
    random subset of ``int(alphabet * rate)`` symbols is shuffled among itself, every other symbol maps to itself (a
    shuffled symbol may land on itself, as in their code)."""
    chosen = torch.rand(batch, alphabet, generator=generator).argsort(dim=1)[:, : int(alphabet * rate)]
    shuffled = chosen.gather(1, torch.rand(chosen.shape, generator=generator).argsort(dim=1))
    return torch.arange(alphabet).repeat(batch, 1).scatter(1, chosen, shuffled)


def scramble(generator: torch.Generator, pi: Tensor, xs: Tensor) -> Tensor:
    """Fang et al. 2025's non-bijective cipher (``nonbi_sub_text``): every occurrence of a symbol that ``pi`` (B x
    alphabet) changes is written as a symbol drawn uniformly, independently per occurrence, from the symbols ``pi``
    changes; symbols ``pi`` keeps stay. The same plain symbol is shown differently at different places and one shown
    symbol stands for several plain ones, so no map from the prompt decodes it. ``xs``: B x ... (0-based)."""
    batch = xs.shape[0]
    flat = xs.reshape(batch, -1)
    changed = pi != torch.arange(pi.shape[1])
    count = changed.sum(dim=1, keepdim=True)
    pool = (~changed).long().argsort(dim=1, stable=True)  # the changed symbols first, per row
    pick = (torch.rand(flat.shape, generator=generator) * count).long().clamp(max=pi.shape[1] - 1)
    out = torch.where(changed.gather(1, flat), pool.gather(1, pick), flat)
    return out.reshape(xs.shape)


def plant_query(generator: torch.Generator, xs: Tensor) -> Tensor:
    """Fang et al. 2025's priority sampling for synthetic inputs: each of the query's symbols (the last of ``xs``'s
    B x (n+1) x length inputs) is copied into its own random slot of the n demonstration inputs, so every query
    symbol occurs in the demonstrations. They pick, for each substituted token of the test input, a demonstration
    that contains it; we draw the demonstrations at random and write the query's symbols into them."""
    batch, count, length = xs.shape
    if count < 2:
        return xs
    demos = xs[:, :-1].reshape(batch, -1).clone()
    slots = torch.rand(demos.shape, generator=generator).argsort(dim=1)[:, :length]
    demos.scatter_(1, slots, xs[:, -1])
    return torch.cat([demos.reshape(batch, count - 1, length), xs[:, -1:]], dim=1)


@dataclass(frozen=True)
class Cipher(SymbolTask):
    """A ``base`` task (copy, successor or reverse) whose inputs are written through a substitution cipher: the
    prompt shows pi(x) -> base(x) (Fang, Mishra, Gao, Liu & Khashabi 2025, "ICL CIPHERS: quantifying 'learning' in
    in-context learning via substitution ciphers", EMNLP; arXiv:2504.19395; github.com/ZhouxiangFang/icl-ciphers
    ``icl_all.py``). With ``base`` copy, the task is deciphering.

    As in their code: ``rate`` (their shuffle rate) is the fraction of the alphabet that is shuffled
    (:func:`substitution`); ``bijective`` shows pi(x), else every occurrence of a shuffled symbol is replaced by a
    random shuffled symbol (:func:`scramble`: the same symbols are touched, but no consistent map exists);
    ``priority`` (their priority sampling, :func:`plant_query`) makes every symbol of the query occur in the
    demonstrations, so a bijective cipher can be decoded from the prompt alone and the bijective vs non-bijective gap
    measures learning in context. ``per_prompt``: a fresh pi per prompt (only in-context learning can decode it),
    else one pi fixed by ``seed`` (their setting: one cipher per run; a model trained on it may store it in its
    weights).

    Differences from Fang et al.: symbols of a synthetic alphabet instead of a tokenizer's words (no Zipfian bands,
    no word-initial vs inner split, no part-of-speech filter, no reserved tokens); the answer is the base task's
    output on the plain symbols instead of a class label; priority sampling writes the query's symbols into random
    demonstrations instead of choosing demonstrations from a pool; inputs are drawn with replacement, so with
    ``priority`` and ``length`` 1 the query repeats one demonstration's input. ``priority`` false keeps the plain
    layout of the other tasks (single symbols distinct within a prompt)."""

    alphabet: int = 26
    length: int = 1
    base: Literal["copy", "successor", "reverse"] = "copy"
    bijective: bool = True
    per_prompt: bool = True
    priority: bool = True
    rate: float = 1.0
    seed: int = 0
    name: str = "cipher"

    def cipher(self, generator: torch.Generator, batch: int) -> Tensor:
        """The bijective substitutions of ``batch`` prompts (B x alphabet)."""
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"token task {self.name!r}: rate must be in [0, 1], got {self.rate}")
        if self.per_prompt:
            return substitution(generator, batch, self.alphabet, self.rate)
        fixed = substitution(torch.Generator().manual_seed(self.seed), 1, self.alphabet, self.rate)
        return fixed.expand(batch, -1)

    def shown(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The enciphered inputs: pi(x) symbol by symbol, or (non-bijective) the shuffled symbols scrambled."""
        pi = self.cipher(generator, xs.shape[0])
        if not self.bijective:
            return scramble(generator, pi, xs)
        return pi.gather(1, xs.reshape(xs.shape[0], -1)).reshape(xs.shape)

    def answer(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The base task's answer on the plain inputs."""
        return base_answer(self.base, xs, self.alphabet)

    def sample(self, generator: torch.Generator, batch: int, n_examples: int) -> TokenPrompts:
        """``batch`` prompts of ``n_examples`` demonstrations followed by one query (query symbols planted in the
        demonstrations with ``priority``)."""
        if n_examples < 0:
            raise DataError(f"token task {self.name!r}: n_examples must be >= 0, got {n_examples}")
        if not self.priority:
            return super().sample(generator, batch, n_examples)
        xs = torch.randint(0, self.alphabet, (batch, n_examples + 1, self.length), generator=generator)
        xs = plant_query(generator, xs)
        return layout(self.shown(generator, xs), self.answer(generator, xs))


def base_answer(base: str, xs: Tensor, alphabet: int) -> Tensor:
    """The cipher's base task on plain symbols ``xs`` (B x ... x length)."""
    if base == "successor":
        return (xs + 1) % alphabet
    return xs.flip(-1) if base == "reverse" else xs.clone()


def base_inverse(base: str, ys: Tensor, alphabet: int) -> Tensor:
    """The plain inputs of the base task's outputs ``ys`` (every base task is invertible)."""
    if base == "successor":
        return (ys - 1) % alphabet
    return ys.flip(-1) if base == "reverse" else ys.clone()


def decipher(task: Cipher, prompts: TokenPrompts) -> Tensor:
    """An ideal in-context decoder that reads only the prompt (B x length answer tokens, -1 where it cannot tell):
    the demonstrations' plain inputs are their outputs through the inverse base task; each shown query symbol is read
    as the plain symbol it is aligned with most often in the demonstrations (ties: the smallest), then the base task
    is applied. It is exact on a bijective cipher with ``priority`` and near chance on the shuffled symbols of a
    non-bijective one (the upper bound of what a model can decode in context)."""
    a, s = task.alphabet, task.length
    batch, width = prompts.tokens.shape[0], 2 * s + 2
    n = (prompts.tokens.shape[1] - s - 1) // width
    demos = prompts.tokens[:, : n * width].reshape(batch, n, width) - SYMBOLS
    shown, plain = demos[:, :, :s].reshape(batch, -1), base_inverse(task.base, demos[:, :, s + 1: 2 * s + 1], a)
    counts = torch.zeros(batch, a, a)
    rows = torch.arange(batch)[:, None].expand_as(shown)
    counts.index_put_((rows, shown, plain.reshape(batch, -1)), torch.ones(shown.shape), accumulate=True)
    query = prompts.tokens[:, n * width: n * width + s] - SYMBOLS
    votes = counts.gather(1, query[:, :, None].expand(-1, -1, a))  # B x s x a
    read = base_answer(task.base, votes.argmax(dim=-1), a) + SYMBOLS
    unseen = (votes.sum(dim=-1) == 0)
    if task.base == "reverse":
        unseen = unseen.flip(-1)
    return torch.where(unseen, torch.full_like(read, -1), read)


@dataclass(frozen=True)
class Lookup(SymbolTask):
    """A fixed table of ``pairs`` key -> value pairs, the same in every prompt (a country -> capital stand-in):
    keys are symbols 0..pairs-1, values symbols pairs..2*pairs-1 in a random order fixed by ``seed``."""

    pairs: int = 20
    seed: int = 0
    name: str = "lookup"

    @property
    def alphabet(self) -> int:  # type: ignore[override]
        """Keys and values."""
        return 2 * self.pairs

    def table(self) -> Tensor:
        """value of key k (0-based symbols), fixed by ``seed``."""
        return self.pairs + torch.randperm(self.pairs, generator=torch.Generator().manual_seed(self.seed))

    def sample(self, generator: torch.Generator, batch: int, n_examples: int) -> TokenPrompts:
        """Distinct keys per prompt, their values as answers."""
        keys = draw_inputs(generator, batch, n_examples + 1, 1, self.pairs, self.name)
        return layout(keys, self.table()[keys])


# ---------------------------------------------------------------- registry


class AlphabetParams(BaseModel):
    """Parameters of successor."""

    model_config = ConfigDict(extra="forbid")
    alphabet: int = Field(26, ge=2, description="number of symbols")


class SequenceParams(AlphabetParams):
    """Parameters of copy and reverse."""

    length: int = Field(3, ge=1, description="tokens per input and per answer (1: single-token variant)")


class CipherParams(AlphabetParams):
    """Parameters of the substitution cipher."""

    length: int = Field(1, ge=1, description="tokens per input and per answer")
    base: Literal["copy", "successor", "reverse"] = Field("copy", description="the task whose inputs are enciphered")
    bijective: bool = Field(True, description="a permutation (true) or each occurrence scrambled (false; Fang et al.)")
    per_prompt: bool = Field(True, description="a fresh cipher per prompt (true) or one fixed by seed (false)")
    priority: bool = Field(True, description="every query symbol also occurs in the demonstrations (Fang et al.'s "
                           "priority sampling); false: distinct single-symbol inputs like the other tasks")
    rate: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the alphabet that is shuffled (shuffle rate)")
    seed: int = Field(0, description="the fixed cipher's seed")


class LookupParams(BaseModel):
    """Parameters of the fixed lookup table."""

    model_config = ConfigDict(extra="forbid")
    pairs: int = Field(20, ge=1, description="key -> value pairs in the table")
    seed: int = Field(0, description="the table's seed")


TOKEN_TASKS: Registry[Callable[[BaseModel], SymbolTask]] = Registry("token task")
_HENDEL = "Hendel et al. 2023, Findings of EMNLP"

TOKEN_TASKS.register("successor", params=AlphabetParams, summary="y = x + 1 mod alphabet", paper=_HENDEL)(
    lambda p: Successor(**p.model_dump()))
TOKEN_TASKS.register("copy", params=SequenceParams, summary="y = x", paper=_HENDEL)(lambda p: Copy(**p.model_dump()))
TOKEN_TASKS.register("reverse", params=SequenceParams, summary="y = x reversed", paper=_HENDEL)(
    lambda p: Reverse(**p.model_dump()))
TOKEN_TASKS.register("cipher", params=CipherParams, summary="a base task on enciphered inputs",
                     paper="Fang et al. 2025, ICL CIPHERS, EMNLP")(lambda p: Cipher(**p.model_dump()))
TOKEN_TASKS.register("lookup", params=LookupParams, summary="fixed key -> value pairs", paper=_HENDEL)(
    lambda p: Lookup(**p.model_dump()))


def build_token_task(name: str, params: dict | BaseModel | None = None, where: str = "") -> SymbolTask:
    """The token task ``name`` with its validated ``params`` (errors name the key under ``where``)."""
    return TOKEN_TASKS.build(name, params, where=where)
