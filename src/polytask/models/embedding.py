"""Categorical inputs embedded in front of a backbone.

A table suite with categorical columns (``TaskSuite.categorical``: column -> number of codes, code 0 "unknown")
gives rows whose categorical columns hold integer codes as floats. :class:`Embedded` looks each code up in its
column's ``nn.Embedding``, concatenates the embeddings after the numeric columns and feeds the backbone, so the
backbone sees numbers only and the embeddings are part of the shared encoder (the multi-task architecture receives
``Embedded`` as its encoder: every task trains the embeddings, as entity embeddings in Guo & Berkhahn, 2016,
"Entity Embeddings of Categorical Variables", arXiv:1604.06737).

The default width of a column's embedding is fastai's rule of thumb (Howard & Gugger, 2020, "Fastai: A Layered API
for Deep Learning", Information 11(2); ``fastai.tabular.model.emb_sz_rule``): round(1.6 * n ** 0.56) for n codes.
Deliberate difference: fastai caps it at 600, here at 16 (tables of a few categorical columns and small backbones);
``model.embedding_dim`` sets one width for every column instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError

MAX_DEFAULT_DIM = 16


def embedding_width(codes: int) -> int:
    """The default embedding width of a column of ``codes`` codes: min(16, round(1.6 * codes ** 0.56)), at least 1
    (fastai's ``emb_sz_rule`` with a cap of 16 instead of 600)."""
    return max(1, min(MAX_DEFAULT_DIM, round(1.6 * codes ** 0.56)))


def embedded_width(columns: int, categorical: Mapping[int, int], embedding_dim: int | None = None) -> int:
    """The width of the rows the backbone reads: the numeric columns plus every categorical column's embedding."""
    return columns - len(categorical) + sum(embedding_dim or embedding_width(n) for n in categorical.values())


class Embedded(nn.Module):
    """``backbone`` applied to rows of ``columns`` inputs whose ``categorical`` columns (column -> codes) are
    replaced by learned embeddings: [numeric columns in order, then one embedding per categorical column in column
    order]. ``embedding_dim``: one width for every column (None: :func:`embedding_width` of its codes)."""

    def __init__(self, backbone: nn.Module, columns: int, categorical: Mapping[int, int],
                 embedding_dim: int | None = None) -> None:
        super().__init__()
        if not categorical:
            raise ConfigError("Embedded needs at least one categorical column")
        bad = [c for c, n in categorical.items() if not 0 <= c < columns or n < 1]
        if bad:
            raise ConfigError(f"categorical column(s) {bad} do not fit inputs of {columns} column(s) with >= 1 code")
        self.backbone = backbone
        self.columns = sorted(categorical)
        self.codes = [int(categorical[c]) for c in self.columns]
        self.embeddings = nn.ModuleList(
            nn.Embedding(n, embedding_dim or embedding_width(n)) for n in self.codes)
        numeric = [c for c in range(columns) if c not in categorical]
        self.register_buffer("numeric", torch.tensor(numeric, dtype=torch.long), persistent=False)
        self.register_buffer("categorical", torch.tensor(self.columns, dtype=torch.long), persistent=False)

    def embed(self, x: Tensor) -> Tensor:
        """The rows ``x`` (batch x columns, codes in the categorical columns) as the backbone reads them."""
        codes = x.index_select(1, self.categorical).long()  # type: ignore[arg-type]
        parts = [x.index_select(1, self.numeric)]  # type: ignore[arg-type]
        parts += [emb(codes[:, j]).to(x.dtype) for j, emb in enumerate(self.embeddings)]
        return torch.cat(parts, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The backbone's representation of the embedded rows."""
        return self.backbone(self.embed(x))

    def extra_repr(self) -> str:
        return f"categorical={dict(zip(self.columns, self.codes, strict=True))}"
