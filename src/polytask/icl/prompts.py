"""What an in-context task samples and what a model reads: the shared contract of ``polytask.icl``.

Two kinds of task family, as in the seed papers:

- a **function class** (Garg et al. 2022, "What can transformers learn in-context?"): draw f from the class and
  x_1..x_n from the input distribution; a prompt is (x_1, f(x_1), ..., x_n, f(x_n)) and the model predicts
  f(x_i) from every prefix x_1, f(x_1), ..., x_i (each prefix is one query, the loss is averaged over them);
- a **token task** (successor, copy, reverse, a substitution cipher, a lookup): demonstrations written as tokens,
  ``x_1 → y_1 ; x_2 → y_2 ; ... ; x_q →`` and the answer y_q after the final arrow (Hendel et al. 2023's format,
  with our own small vocabulary instead of a tokenizer's words).

Every sampler is a pure function of a ``torch.Generator`` (same generator state, same prompts), so training
batches are a pure function of (seed, epoch, step) and resuming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

# Token-task vocabulary: these ids are reserved; a task's symbols are SYMBOLS, SYMBOLS + 1, ...
PAD, ARROW, SEP = 0, 1, 2
SYMBOLS = 3


@dataclass(frozen=True)
class Prompts:
    """``B`` prompts of ``n`` points of one function class: ``xs`` B x n x d, ``ys`` B x n (float32).
    ``ws`` (optional): the drawn functions' parameters where the class has them (B x d for linear regression),
    for baselines that may use the truth and for tests."""

    xs: Tensor
    ys: Tensor
    ws: Tensor | None = None

    def __post_init__(self) -> None:
        if self.xs.dim() != 3 or self.ys.shape != self.xs.shape[:2]:
            raise ValueError(f"Prompts: xs must be B x n x d and ys B x n, got {tuple(self.xs.shape)} and "
                             f"{tuple(self.ys.shape)}")


@dataclass(frozen=True)
class TokenPrompts:
    """``B`` token prompts, all of one length: ``tokens`` B x L (long), ``x_1 ARROW y_1 SEP ... x_q ARROW`` where
    each x_i and y_i is a fixed number of symbol tokens for the task; ``answers`` B x m (long), the m tokens of y_q
    that follow the final ARROW (m = 1 for the single-token tasks that task vectors patch). ``query``: B, the index
    in ``tokens`` of the final ARROW (the position whose hidden state a task vector is read from and patched into;
    the last position when every prompt has the same layout)."""

    tokens: Tensor
    answers: Tensor
    query: Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.answers.dim() != 2 or self.answers.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"TokenPrompts: tokens must be B x L and answers B x m, got {tuple(self.tokens.shape)} "
                             f"and {tuple(self.answers.shape)}")


class FunctionClass(Protocol):
    """A family of functions R^d -> R with an input distribution (``polytask.icl.functions``)."""

    name: str
    dim: int

    def sample(self, generator: torch.Generator, batch: int, n_points: int, dim: int | None = None) -> Prompts:
        """``batch`` prompts of ``n_points`` points, each with its own function; ``dim`` < ``self.dim`` (a
        curriculum) zeroes the inputs' last coordinates, as Garg et al.'s curriculum does."""
        ...


class TokenTask(Protocol):
    """A discrete task on symbols (``polytask.icl.discrete``); ``vocab_size`` counts the reserved ids too."""

    name: str
    vocab_size: int

    def sample(self, generator: torch.Generator, batch: int, n_examples: int) -> TokenPrompts:
        """``batch`` prompts of ``n_examples`` demonstrations followed by one query."""
        ...
