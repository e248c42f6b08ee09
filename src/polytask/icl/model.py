"""Small GPT-2 models that learn tasks in context, as polytask multi-task models (one output per task family).

- :class:`FunctionModel`: Garg et al. 2022 ("What can transformers learn in-context?", NeurIPS; their
  ``src/models.py`` ``TransformerModel``): a randomly initialised ``transformers`` GPT2Model reads the interleaved
  sequence x_1, [y_1, 0, ..., 0], x_2, ... through a linear read-in and predicts f(x_i) with a linear read-out at
  every x position (``_combine``), so one forward pass scores every prefix of a prompt.
- :class:`TokenModel`: a randomly initialised GPT2LMHeadModel over the small vocabulary of
  :mod:`polytask.icl.prompts`; its answer is the argmax of the logits at the final ARROW (and, for answers of m
  tokens, at the m - 1 answer tokens fed after it, teacher-forced). Saved as a local Hugging Face directory
  (``save_pretrained``) that ``AutoModelForCausalLM.from_pretrained`` and the task-representation probes load.

How the engine feeds them (``polytask.icl.train``): a function-class source's inputs are ``B x n x (D + 1)``,
the prompt's x's (zero-padded to the model's dimension D) with f(x) in the last column; a token source's inputs
are the prompt's tokens followed by all but the last answer token (long).

Deliberate differences from Garg et al.'s code: one read-out per family (a task head, so polytask's per-task
heads and aggregators apply; with one family it is their model exactly), and inputs of families of lower
dimension are zero-padded to the model's dimension (their curriculum zeroes the same coordinates).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.sharing import MultiTaskModel


def _gpt2_config(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int) -> object:
    """The GPT2Config of Garg et al.'s ``TransformerModel`` (dropout off, no KV cache)."""
    from transformers import GPT2Config

    if n_embd % n_head:
        raise ConfigError(f"model.n_embd: {n_embd} is not a multiple of model.n_head {n_head}")
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                      bos_token_id=None, eos_token_id=None)


def interleave(xs: Tensor, ys: Tensor) -> Tensor:
    """Garg et al.'s ``_combine``: ``B x n x d`` inputs and ``B x n`` outputs as the ``B x 2n x d`` sequence
    x_1, [y_1, 0, ..., 0], x_2, [y_2, 0, ..., 0], ..."""
    b, n, d = xs.shape
    wide = torch.cat([ys.reshape(b, n, 1), xs.new_zeros(b, n, d - 1)], dim=2)
    return torch.stack([xs, wide], dim=2).reshape(b, 2 * n, d)


def pack(xs: Tensor, ys: Tensor, dim: int) -> Tensor:
    """A function-class prompt as one engine input: ``B x n x (dim + 1)``, the x's zero-padded to ``dim`` then
    the y's."""
    b, n, d = xs.shape
    if d > dim:
        raise ConfigError(f"model dimension {dim} is smaller than the prompts' dimension {d}")
    padded = torch.cat([xs, xs.new_zeros(b, n, dim - d)], dim=2) if d < dim else xs
    return torch.cat([padded, ys.reshape(b, n, 1).to(xs.dtype)], dim=2)


class FunctionModel(MultiTaskModel):
    """Garg et al.'s in-context regression transformer with one linear read-out per family.

    ``forward(x, tasks)``: ``x`` is ``B x n x (dim + 1)`` (:func:`pack`); returns per family ``B x n``, the
    prediction of f(x_i) made from x_1, f(x_1), ..., x_i."""

    def __init__(self, families: Sequence[str], dim: int, max_points: int, n_embd: int = 128, n_layer: int = 4,
                 n_head: int = 4) -> None:
        super().__init__()
        from transformers import GPT2Model

        self.dim, self.max_points = dim, max_points
        self.task_names = list(families)
        self.read_in = nn.Linear(dim, n_embd)
        self.backbone = GPT2Model(_gpt2_config(1, 2 * max_points, n_embd, n_layer, n_head))
        # the token embedding is never read (the backbone reads ``inputs_embeds``): frozen, it is no shared parameter
        # (an aggregator's per-task gradient rows of it would be empty)
        self.backbone.wte.weight.requires_grad_(False)
        self.read_out = nn.ModuleDict({f: nn.Linear(n_embd, 1) for f in families})

    def features(self, x: Tensor) -> list[Tensor]:
        """The backbone's last hidden state at every position of the interleaved sequence (``B x 2n x n_embd``)."""
        n = x.shape[1]
        if n > self.max_points:
            raise ConfigError(f"a prompt of {n} points is longer than the model's max_points {self.max_points}")
        zs = interleave(x[..., :-1], x[..., -1])
        return [self.backbone(inputs_embeds=self.read_in(zs)).last_hidden_state]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Each family's read-out at the x positions (0, 2, 4, ...)."""
        h = features[0][:, ::2]
        return {t: self.read_out[t](h)[..., 0] for t in (tasks or self.task_names)}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Read-in and transformer (its unused token embedding left out): what every family trains."""
        yield from self.read_in.parameters()
        yield from (p for p in self.backbone.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The family's read-out."""
        return self.read_out[task].parameters()


class TokenModel(MultiTaskModel):
    """A GPT-2 language model over the token tasks' vocabulary; every family shares all of it (no head of its own).

    ``forward(x, tasks)``: ``x`` is ``B x (L + m - 1)`` tokens, the prompt (final ARROW at ``L - 1``) then the
    first m - 1 answer tokens; returns per family the logits ``B x V`` (m = 1) or ``B x V x m`` at positions
    ``L - 1 .. L + m - 2`` (the layout ``F.cross_entropy`` takes against ``B x m`` answers)."""

    def __init__(self, families: Sequence[str], vocab_size: int, n_positions: int, answer_tokens: int = 1,
                 n_embd: int = 128, n_layer: int = 4, n_head: int = 4) -> None:
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.task_names = list(families)
        self.answer_tokens = answer_tokens
        self.lm = GPT2LMHeadModel(_gpt2_config(vocab_size, n_positions, n_embd, n_layer, n_head))

    @classmethod
    def from_pretrained(cls, path: str | Path, families: Sequence[str], answer_tokens: int = 1) -> TokenModel:
        """A model whose language model is the Hugging Face directory ``path`` (what :meth:`save_pretrained` wrote)."""
        from transformers import GPT2LMHeadModel

        model = cls.__new__(cls)
        MultiTaskModel.__init__(model)
        model.task_names, model.answer_tokens = list(families), answer_tokens
        model.lm = GPT2LMHeadModel.from_pretrained(str(path))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Write the language model as a local Hugging Face directory (config.json, model.safetensors)."""
        self.lm.save_pretrained(str(path), safe_serialization=True)

    def logits(self, tokens: Tensor) -> Tensor:
        """The language model's logits ``B x T x V`` of ``tokens`` (B x T)."""
        return self.lm(input_ids=tokens.long()).logits

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        m = self.answer_tokens
        logits = self.logits(x)[:, x.shape[1] - m:]  # the final ARROW and the m - 1 answer tokens after it
        out = logits[:, 0] if m == 1 else logits.transpose(1, 2)
        return {t: out for t in (tasks or self.task_names)}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """All of the language model (the families share every weight)."""
        return self.lm.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """None: a token family has no weights of its own."""
        return iter(())


@torch.no_grad()
def predict_answers(model: TokenModel, tokens: Tensor, answer_tokens: int) -> Tensor:
    """Greedy answers ``B x m`` after the final ARROW of ``tokens`` (B x L): each token the argmax of the logits,
    fed back for the next one (what the token tasks' accuracy scores)."""
    seq = tokens.long()
    out = []
    for _ in range(answer_tokens):
        nxt = model.logits(seq)[:, -1].argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return torch.stack(out, dim=1)
