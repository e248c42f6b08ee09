"""Discrete token tasks for in-context learning and task vectors (Hendel et al. 2023, "In-context learning creates
task vectors", Findings of EMNLP; their ``core/data/tasks``), written in our own small vocabulary.

A prompt is ``x_1 ARROW y_1 SEP ... x_n ARROW y_n SEP x_q ARROW`` and the answer is y_q (the
:class:`polytask.icl.prompts.TokenPrompts` layout). A task over an alphabet of ``a`` symbols uses the token ids
``SYMBOLS .. SYMBOLS + a - 1``; ``vocab_size`` counts the reserved ids too. Inputs of one token are drawn without
replacement within a prompt (no demonstration repeats the query, as Hendel et al. draw distinct examples); inputs of
several tokens are drawn token by token (a repeat is then improbable, not excluded).

Tasks: successor (y = x + 1 mod a), copy (y = x), reverse (y = x reversed), a substitution cipher (the
reformulation of Fang et al. 2024, "ICL Ciphers": the inputs of a base task are enciphered by a bijective or a
non-bijective substitution, per prompt or fixed, so a bijective cipher keeps the task learnable in context while a
non-bijective one makes it ambiguous), and a fixed lookup table (a country -> capital stand-in: the same random
pairs in every prompt, so the answer is recalled rather than inferred).

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


def substitution(generator: torch.Generator, batch: int, alphabet: int, bijective: bool) -> Tensor:
    """``batch`` substitutions (B x alphabet, symbol -> symbol): random permutations, or (non-bijective) exactly
    two-to-one maps onto ``alphabet // 2`` random symbols (symbol s goes to sigma(tau(s) mod alphabet//2) for random
    permutations sigma, tau; with an odd alphabet one target has three preimages)."""
    perm = torch.rand(batch, alphabet, generator=generator).argsort(dim=1)
    if bijective:
        return perm
    targets = torch.rand(batch, alphabet, generator=generator).argsort(dim=1)
    return targets.gather(1, perm % (alphabet // 2))


@dataclass(frozen=True)
class Cipher(SymbolTask):
    """A ``base`` task (copy, successor or reverse) whose inputs are written through a substitution cipher: the
    prompt shows pi(x) -> base(x) (Fang et al. 2024, "ICL Ciphers"). ``bijective``: pi is a permutation (the task
    stays a function of what the prompt shows, so it can be learnt in context); else pi is two-to-one (the control:
    the answer is ambiguous). ``per_prompt``: a fresh pi per prompt (only in-context learning can decode it), else one
    pi fixed by ``seed`` (a model may learn it in its weights). With ``base`` copy, the task is deciphering.

    Difference from Fang et al.: they encipher the words of natural-language tasks (and draw their non-bijective
    maps differently); here the symbols of our own tasks."""

    alphabet: int = 26
    length: int = 1
    base: Literal["copy", "successor", "reverse"] = "copy"
    bijective: bool = True
    per_prompt: bool = True
    seed: int = 0
    name: str = "cipher"

    def cipher(self, generator: torch.Generator, batch: int) -> Tensor:
        """The substitutions of ``batch`` prompts (B x alphabet)."""
        if not self.bijective and self.alphabet < 2:
            raise ConfigError(f"token task {self.name!r}: a non-bijective cipher needs an alphabet of at least 2")
        if self.per_prompt:
            return substitution(generator, batch, self.alphabet, self.bijective)
        fixed = substitution(torch.Generator().manual_seed(self.seed), 1, self.alphabet, self.bijective)
        return fixed.expand(batch, -1)

    def shown(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """pi(x), symbol by symbol (pi drawn from ``generator`` when per prompt)."""
        pi = self.cipher(generator, xs.shape[0])
        return pi.gather(1, xs.reshape(xs.shape[0], -1)).reshape(xs.shape)

    def answer(self, generator: torch.Generator, xs: Tensor) -> Tensor:
        """The base task's answer on the plain inputs."""
        if self.base == "successor":
            return (xs + 1) % self.alphabet
        return xs.flip(-1) if self.base == "reverse" else xs.clone()


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
    bijective: bool = Field(True, description="a permutation (true) or a two-to-one map (false)")
    per_prompt: bool = Field(True, description="a fresh cipher per prompt (true) or one fixed by seed (false)")
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
                     paper="Fang et al. 2024, ICL Ciphers")(lambda p: Cipher(**p.model_dump()))
TOKEN_TASKS.register("lookup", params=LookupParams, summary="fixed key -> value pairs", paper=_HENDEL)(
    lambda p: Lookup(**p.model_dump()))


def build_token_task(name: str, params: dict | BaseModel | None = None, where: str = "") -> SymbolTask:
    """The token task ``name`` with its validated ``params`` (errors name the key under ``where``)."""
    return TOKEN_TASKS.build(name, params, where=where)
