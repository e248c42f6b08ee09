"""Learning to Prompt (Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy & Pfister 2022, "Learning to Prompt for
Continual Learning", CVPR; reference code github.com/google-research/l2p, JAX, and its PyTorch reimplementation
github.com/JH-LEE-KR/l2p-pytorch, which the JAX README points to), on a frozen pretrained Hugging Face encoder.

A pool of M prompts P_j (L_p x D each) with learnable keys k_j (D) rides on a frozen encoder f (the ``hf``
backbone). The query of an input x is the frozen encoder's own pooled feature without prompts, q(x) = f(x), pooled
as the backbone pools ([CLS] or mean; Sec. 3.3). The N keys with the largest cosine similarity to q(x) are selected
(Eq. 3, with the paper's γ(q, k) = 1 - cos(q, k)); their prompts, in order of similarity, are inserted into the
token embeddings of x (x_p, Eq. 2), the frozen encoder runs on the extended sequence, and each task's head reads the
mean of the N·L_p prompt positions of the last layer (f^avg, Sec. 3.2; the references' ``classifier = "prompt"``).
The training objective is Eq. 5: CE(g(f^avg(x_p)), y) + λ Σ_{i ∈ K_x} γ(q(x), k_si), the second term summed over the
selected keys and averaged over the batch (:func:`pull_loss`), added as the strategy's extra loss. Selection is not
differentiable, so the surrogate term alone trains the keys: it pulls the selected keys toward the queries. In
training, the logits of classes that the current experience does not train are -inf (the references' ``train_mask``:
in the class scenario each experience's softmax covers its own classes); evaluation uses every logit, without a
task id, as the paper's class-incremental inference does. Only the prompts, the keys and the heads train.

Deliberate differences from the paper and the reference code:

- Text, not images. Prompts go in after the first token ([CLS], which must be a real token in every row) and are
  passed with the text's word embeddings as ``inputs_embeds``, so the encoder's embedding layer adds its position
  embeddings (positions 1..N·L_p; the text's tokens move right by N·L_p), its token-type embedding and its LayerNorm
  to the prompts as to any token. The PyTorch reimplementation also puts the prompts after the class token with
  position embeddings (the class token's, repeated); the JAX code prepends them before the class token, after the
  position embeddings. ``inputs_embeds`` keeps this model-agnostic: any encoder that takes ``inputs_embeds``.
- Initialisation: prompts and keys uniform in [-1, 1] (the PyTorch reimplementation; the JAX code uses flax's
  default uniform, [0, 0.01)), drawn from a generator seeded by the run's seed. The heads are polytask's task heads
  (``nn.Linear`` with PyTorch's default initialisation; the JAX head starts at zero), one per task of the stream.
- Defaults: M = 10, N = 5, L_p = 5 (the paper's Split CIFAR-100 setting and the PyTorch defaults), λ = 0.1 (the
  PyTorch default; the JAX CIFAR-100 config has L_p = 10, N = 4, λ = 1.0). The references' optimiser (Adam,
  constant lr 0.03 scaled by batch/256, 5 epochs) is the run's ``train`` config, not set here.
- Batch-wise selection (both references, on by default, at training and test time: every row of a batch takes the
  N prompts chosen most often by the batch's rows) is an option (``batchwise``, off by default: the paper describes
  per-input selection) and applies at training only: at test each row selects its own prompts, so a prediction never
  depends on the other rows of its batch. Ties in the vote go to the lower prompt id (the references take a top-k of
  the counts, whose order among ties is unspecified). With ``train.accumulate`` > 1 the surrogate's vote is over the
  effective batch, the forward's over each micro-batch.
- ``task_prompts`` is the references' ``use_prompt_mask`` (their 5-datasets config): experience i trains prompts
  iN..iN+N-1 (while they exist in the pool) instead of the selected ones; inference still selects by the keys. The
  paper's frequency penalty for diversified selection (Sec. 3.3) is not implemented, as in the reference code.
- Gradient clipping: the references clip the gradient norm of what trains at 1.0 every step; here ``clip_grad_norm``
  (default 1.0, 0: off) does the same in ``before_update``, after the extra loss's gradients are added.
- Scenarios: the paper studies class-incremental, domain-incremental and task-agnostic streams; here every scenario
  runs (the task and multitask scenarios give each task its own head, the prompt pool is shared; the class mask only
  changes something where an experience trains a subset of a task's classes).
- The surrogate term needs the queries of the step's rows: the model keeps the queries of the last batch it saw and
  reuses them when the same inputs come again, so the step's forward pass and the extra loss share one query pass
  (the query is a pure function of the inputs: the encoder is frozen).
- Composition: with ``train_mask``, the training logits of other classes are -inf for every train-mode forward, a
  replayed row's too (its loss would be infinite); compose l2p with a rehearsal strategy only with
  ``train_mask: false`` (the JAX code's ``replay_no_mask`` masks the new rows only; it is not reproduced).

The strategy keeps no state of its own: the prompt pool (M·L_p·D + M·D numbers) is part of the model, in its
``state_dict`` and every checkpoint; the frozen encoder is not (the ``hf`` backbone leaves frozen weights out).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import SCENARIOS, Stream, labelled_classes
from polytask.errors import ConfigError, DataError
from polytask.models.hf import HFEncoder
from polytask.models.sharing import HardSharing, MultiTaskModel


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` along the last axis, the norm floored at ``sqrt(eps)`` (the references' ``l2_normalize``)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True).clamp_min(eps))


def cosine_similarity(query: Tensor, keys: Tensor) -> Tensor:
    """(B, M) cosine similarities of each query (B, D) with each key (M, D): γ = 1 - this (Wang et al. 2022, Eq. 3)."""
    return l2_normalize(query) @ l2_normalize(keys).T


def top_keys(similarity: Tensor, n: int) -> Tensor:
    """(B, n) ids of each row's n most similar keys, most similar first (K_x of Eq. 3)."""
    return similarity.topk(n, dim=1).indices


def batch_vote(ids: Tensor, pool_size: int, n: int) -> Tensor:
    """(B, n): the n prompt ids chosen most often by the rows' selections ``ids`` (B, N), for every row; ties go to
    the lower id (the references' batch-wise selection, a majority vote)."""
    counts = torch.bincount(ids.flatten(), minlength=pool_size)
    chosen = torch.sort(counts, descending=True, stable=True).indices[:n]
    return chosen.expand(ids.shape[0], n)


def pull_loss(query: Tensor, keys: Tensor, ids: Tensor) -> Tensor:
    """Σ_{i ∈ K_x} (1 - cos(q(x), k_i)) averaged over the rows: Eq. 5's surrogate term (without λ). Its gradient
    reaches the selected keys only; the query is a constant (the frozen encoder's feature)."""
    selected = l2_normalize(keys)[ids]  # (B, N, D)
    cos = (selected * l2_normalize(query.detach()).unsqueeze(1)).sum(-1)
    return (1.0 - cos).sum(1).mean()


def _tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask of (N, 2, L) inputs, without the columns that are padding in every row (as the
    ``hf`` backbone reads them)."""
    if x.dim() != 3 or x.shape[1] != 2 or x.is_floating_point():
        raise DataError(f"l2p: inputs must be integer (N, 2, L) token ids and attention mask, as the text suite and "
                        f"the table stream's text column give, got {tuple(x.shape)} {x.dtype}")
    ids, mask = x[:, 0], x[:, 1]
    keep = mask.any(0)
    if not bool(keep.all()):
        ids, mask = ids[:, keep], mask[:, keep]
    if ids.shape[1] and not bool(mask[:, 0].all()):
        raise DataError("l2p: inserts its prompts after each row's first token ([CLS]); some rows start with "
                        "padding (a left-padding tokenizer), which is not supported")
    return ids, mask


class L2PModel(MultiTaskModel):
    """A frozen ``hf`` encoder prompted from a pool (Wang et al. 2022): ``forward(x, tasks)`` selects each row's
    prompts by key matching, runs the encoder on [CLS] + prompts + text and reads the mean of the prompt positions.

    Shared parameters are the prompts (every task's loss reaches them); each task's head is its own; the keys are
    trained by the surrogate loss alone (an extra loss), so they are neither. In training mode ``allowed[task]``
    masks the logits of classes outside the current experience and ``forced`` fixes the prompt ids."""

    def __init__(self, encoder: HFEncoder, heads: nn.ModuleDict, task_names: Sequence[str], prompts: Tensor,
                 keys: Tensor, top_n: int, batchwise: bool) -> None:
        super().__init__()
        self.encoder, self.heads, self.task_names = encoder, heads, list(task_names)
        self.prompts = nn.Parameter(prompts)  # (M, L_p, D)
        self.keys = nn.Parameter(keys)  # (M, D)
        self.top_n, self.batchwise = top_n, batchwise
        self.allowed: dict[str, Tensor] = {}
        self.forced: Tensor | None = None
        self._memo: tuple[Tensor, Tensor] | None = None

    @property
    def pool_size(self) -> int:
        """M, the number of prompts in the pool."""
        return self.prompts.shape[0]

    def query(self, x: Tensor) -> Tensor:
        """q(x): the frozen encoder's pooled feature of ``x`` without prompts (no graph). The last batch's queries are
        kept and reused for the same inputs (the step's forward and the surrogate loss read the same rows)."""
        if self._memo is not None:
            seen, q = self._memo
            if seen.shape == x.shape and seen.device == x.device and torch.equal(seen, x):
                return q
        with torch.no_grad():
            q = self.encoder(x)
        self._memo = (x.detach().clone(), q)
        return q

    def select(self, query: Tensor) -> Tensor:
        """(B, N) prompt ids for queries (B, D): the top-N keys by cosine similarity; in training, the batch's vote
        when ``batchwise``, or the experience's own prompts when ``forced``."""
        if self.training and self.forced is not None:
            return self.forced.to(query.device).expand(query.shape[0], -1)
        with torch.no_grad():
            ids = top_keys(cosine_similarity(query, self.keys), self.top_n)
        if self.training and self.batchwise:
            ids = batch_vote(ids, self.pool_size, self.top_n)
        return ids

    def prompted(self, x: Tensor, ids: Tensor) -> Tensor:
        """f^avg(x_p): the mean last-layer state of the prompt positions, the prompts of ``ids`` (B, N) inserted
        after the first token of ``x``."""
        tokens, mask = _tokens(x)
        model = self.encoder.model
        words = model.get_input_embeddings()(tokens)  # (B, L, D), frozen
        prompts = self.prompts[ids].flatten(1, 2).to(words.dtype)  # (B, N·L_p, D)
        length = prompts.shape[1]
        seq = torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1)
        full_mask = torch.cat([mask[:, :1], mask.new_ones(mask.shape[0], length), mask[:, 1:]], dim=1)
        hidden = model(inputs_embeds=seq, attention_mask=full_mask).last_hidden_state
        return hidden[:, 1:1 + length].mean(1)

    def features(self, x: Tensor) -> list[Tensor]:
        """The one shared feature: f^avg of the prompted input (graph attached to the prompts)."""
        return [self.prompted(x, self.select(self.query(x)))]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Each task's head on the feature; in training, -inf for the classes the current experience does not train."""
        out = {}
        for t in tasks or self.task_names:
            o = self.heads[t](features[0])
            allowed = self.allowed.get(t) if self.training else None
            if allowed is not None:
                o = o.masked_fill(~allowed.to(o.device), float("-inf"))
            out[t] = o
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The prompt pool (the encoder is frozen; the keys get no task gradient)."""
        yield self.prompts

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()


class L2PParams(BaseModel):
    """Parameters of ``l2p`` (defaults: the paper's Split CIFAR-100 setting and the PyTorch reference's λ)."""

    model_config = ConfigDict(extra="forbid")
    pool_size: int = Field(10, ge=1, description="M: prompts in the pool")
    prompt_length: int = Field(5, ge=1, description="L_p: tokens per prompt")
    top_n: int = Field(5, ge=1, description="N: prompts selected per input (N·L_p tokens are inserted)")
    pull: float = Field(0.1, ge=0, description="λ: weight of the surrogate loss pulling selected keys to queries")
    batchwise: bool = Field(False, description="training only: every row of a batch takes the prompts its rows "
                            "select most often (the reference code's batch-wise selection)")
    task_prompts: bool = Field(False, description="training only: experience i trains prompts iN..iN+N-1 while the "
                               "pool has them (the reference code's use_prompt_mask)")
    train_mask: bool = Field(True, description="training logits of classes the current experience does not train "
                             "are -inf (the reference code's train_mask)")
    clip_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm of what trains (0: off)")

    @model_validator(mode="after")
    def _check(self) -> L2PParams:
        if self.top_n > self.pool_size:
            raise ValueError(f"top_n: {self.top_n} prompts selected from a pool of pool_size {self.pool_size}")
        return self


class L2P(Strategy):
    """L2P as a strategy: ``wrap`` builds the prompted model, ``begin`` sets the class mask of the experience,
    ``extra_loss`` adds λ times the surrogate loss, ``before_update`` clips the gradients."""

    name = "l2p"
    scenarios = SCENARIOS

    def __init__(self, params: L2PParams) -> None:
        super().__init__()
        self.params = params
        self.model: L2PModel | None = None

    def wrap(self, model: nn.Module, stream: Stream) -> nn.Module:
        """The prompted model around ``model``'s frozen ``hf`` encoder and heads, its pool drawn from the seed."""
        if not isinstance(model, HardSharing) or not isinstance(model.encoder, HFEncoder):
            what = type(model.encoder).__name__ if isinstance(model, HardSharing) else type(model).__name__
            raise ConfigError(f"strategy l2p prompts a pretrained transformer: it needs model.backbone: hf (a local "
                              f"Hugging Face encoder) with model.architecture: hard; got {what}")
        encoder = model.encoder
        if not encoder.frozen:
            raise ConfigError("strategy l2p keeps the pretrained encoder frozen (only prompts, keys and heads train): "
                              "set model.backbone_params.train: none, without lora")
        config = encoder.model.config
        width = int(config.hidden_size)
        inserted = self.params.top_n * self.params.prompt_length
        longest = stream.input_shape[-1] + inserted
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and longest > limit:
            raise ConfigError(f"strategy l2p: top_n x prompt_length = {inserted} prompt tokens plus the stream's "
                              f"{stream.input_shape[-1]} text tokens make {longest}, more than the encoder's "
                              f"max_position_embeddings ({limit}); lower top_n, prompt_length or the stream's "
                              "max_length")
        g = torch.Generator().manual_seed((self.seed + zlib.crc32(b"l2p")) % 2**63)
        m, length = self.params.pool_size, self.params.prompt_length
        prompts = torch.rand(m, length, width, generator=g) * 2 - 1
        keys = torch.rand(m, width, generator=g) * 2 - 1
        self.model = L2PModel(encoder, model.heads, model.task_names, prompts, keys, self.params.top_n,
                              self.params.batchwise)
        return self.model

    def _wrapped(self) -> L2PModel:
        if self.model is None:
            raise DataError("strategy l2p: its model is built by wrap(model, stream) before the first experience")
        return self.model

    def begin(self, stream: Stream, index: int) -> None:
        """Experience ``index``'s class mask (per classification task: the classes its training rows hold) and,
        with ``task_prompts``, its prompt ids."""
        super().begin(stream, index)
        model = self._wrapped()
        experience = stream.experiences[index]
        model.allowed = {}
        if self.params.train_mask:
            for t in experience.tasks:
                if t.kind == "classification":
                    allowed = torch.zeros(t.n_outputs, dtype=torch.bool)
                    allowed[sorted(labelled_classes(experience, "train", t))] = True
                    model.allowed[t.name] = allowed
        n = self.params.top_n
        own = (index + 1) * n <= self.params.pool_size
        model.forced = torch.arange(index * n, (index + 1) * n) if self.params.task_prompts and own else None

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        """λ Σ_{i ∈ K_x} (1 - cos(q(x), k_i)), averaged over the step's rows (Eq. 5's second term)."""
        if self.params.pull == 0:
            return None
        model = self._wrapped()
        total, rows = None, 0
        for src, r in zip(step.batch.sources, step.batch.rows, strict=True):
            x = src.x[r]
            q = model.query(x)
            term = pull_loss(q, model.keys, model.select(q)) * len(r)
            total = term if total is None else total + term
            rows += len(r)
        return None if total is None else self.params.pull * total / max(rows, 1)

    def before_update(self, run: Any, step: Any) -> None:
        """Clip the gradient norm of the prompts, keys and heads (the references' clip_grad_norm_, 1.0)."""
        if self.params.clip_grad_norm > 0:
            grads = [p for p in self._wrapped().parameters() if p.grad is not None]
            if grads:
                nn.utils.clip_grad_norm_(grads, self.params.clip_grad_norm)


@STRATEGIES.register("l2p", params=L2PParams,
                     summary="learning to prompt: a pool of prompts selected by key-query matching on a frozen "
                     "pretrained hf encoder (prompts, keys and heads train)",
                     paper="Wang et al. 2022, Learning to Prompt for Continual Learning (CVPR)")
def _l2p(params: L2PParams) -> Strategy:
    return L2P(params)
