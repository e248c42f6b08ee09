"""``hf``: a Hugging Face ``transformers`` encoder read from a local directory, as the shared backbone of text tasks.

It reads what the ``text`` suite gives: int64 inputs of shape (N, 2, L), token ids and attention mask stacked,
and returns one pooled vector per row (the model's hidden size is the representation width). Which weights train
is a parameter: none (a frozen feature extractor), all, the top N transformer layers (plus any final norm above
them), or LoRA adapters only (Hu et al. 2021, via PEFT). Nothing is ever downloaded (``local_files_only``).

Two choices keep the engine model-agnostic and cheap. Frozen parameters have ``requires_grad`` False, so they are
not shared parameters (``HardSharing.shared_parameters`` lists what trains) and no per-task gradient is computed
for them; a wholly frozen encoder runs under ``torch.no_grad`` and in eval mode (a fixed feature map: no dropout),
and its features are still the leaves the heads and representation-mode methods differentiate. Frozen parameters
are also left out of the module's ``state_dict`` (checkpoints and ``best.safetensors`` hold what trains, not 90 MB
of unchanged MiniLM weights per job); loading a state dict takes them from the module itself, i.e. from ``path``,
which a run therefore needs to be rebuilt.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.models.backbones import BACKBONES

WHERE = "model.backbone_params"


class LoraParams(BaseModel):
    """LoRA adapters (Hu et al. 2021) through PEFT's ``LoraConfig``."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="scaling: the update is alpha / r * B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | None = Field(
        None, description="names of the linear modules to adapt; default: PEFT's choice for the model type "
        "(query and value for BERT)")


class HFParams(BaseModel):
    """Parameters of the ``hf`` backbone."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a local model directory (config.json and weights, as save_pretrained writes "
                      "them); never downloaded")
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="mean: average of the token states under the attention mask; cls: the first token's")
    train: Literal["none", "all"] | int = Field(
        "none", description="none (frozen), all, or N: the top N transformer layers (and any final norm) train")
    lora: LoraParams | None = Field(None, description="train LoRA adapters only (train must stay none)")

    @field_validator("train", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"train: {str(v).lower()} is ambiguous; use none, all or a number of top layers")
        return v

    @model_validator(mode="after")
    def _check(self) -> HFParams:
        if isinstance(self.train, int) and self.train < 0:
            raise ValueError(f"train: a number of top layers must be >= 0, got {self.train}")
        if self.lora is not None and self.train != "none":
            raise ValueError(f"lora trains the adapters only: leave train at none (got train: {self.train!r})")
        return self


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """One vector per row from token states (B, L, D): ``mean`` over the tokens the mask keeps (Reimers & Gurevych
    2019, Sentence-BERT's pooling), or ``cls``, the first token's state (Devlin et al. 2019)."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class HFEncoder(nn.Module):
    """A transformers model as a backbone: (N, 2, L) int ids and mask in, (N, hidden) pooled features out."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_fill_frozen)

    @property
    def frozen(self) -> bool:
        """True when no parameter of the encoder trains."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> HFEncoder:
        """A wholly frozen encoder stays in eval mode (a fixed feature map, without dropout noise)."""
        return super().train(mode and not self.frozen)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (N, hidden) of token ids and masks (N, 2, L); columns that are padding in every row
        are dropped first (the batch padded to its own longest row, as HF tokenizers pad)."""
        if x.dim() != 3 or x.shape[1] != 2 or x.is_floating_point():
            raise DataError(f"hf backbone: inputs must be integer (N, 2, L) token ids and attention mask, as the "
                            f"text suite gives, got {tuple(x.shape)} {x.dtype}")
        ids, mask = x[:, 0], x[:, 1]
        keep = mask.any(0)  # columns that are padding in every row change nothing: skip them
        if not bool(keep.all()):
            ids, mask = ids[:, keep], mask[:, keep]
        with torch.no_grad() if self.frozen else nullcontext():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(hidden, mask, self.pooling)


def _drop_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name, p in module.named_parameters():
        if not p.requires_grad:
            state_dict.pop(prefix + name, None)


def _fill_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for name, p in module.named_parameters():
        if not p.requires_grad:
            state_dict.setdefault(prefix + name, p.detach())


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers without its progress bars and info logs (restored afterwards)."""
    from transformers.utils import logging

    bar, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def model_dir(path: str, key: str) -> Path:
    """``path`` as a local Hugging Face directory (with config.json), else a ConfigError naming ``key`` and it."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json"
        raise ConfigError(f"{key}: {p} {what}; give a local Hugging Face model directory (as save_pretrained "
                          "writes it: config.json and the weights); polytask never downloads models")
    return p


def layer_list(model: nn.Module) -> tuple[str, int]:
    """The transformer blocks: the longest ``nn.ModuleList`` of the model (BERT's ``encoder.layer``, GPT-2's
    ``h``); its name and length."""
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{WHERE}.train: cannot find the transformer layers of {type(model).__name__} (it has no "
                          "nn.ModuleList); use train: all or none")
    return max(lists, key=lambda item: item[1])


def trainable(model: nn.Module, train: str | int) -> set[str]:
    """Names of the parameters that train: ``all``; ``none`` (or 0); N: the top N blocks of :func:`layer_list` and
    the parameters registered after them (a final norm). The pooler never trains: the backbone pools the last
    hidden states itself, so its weights get no gradient."""
    names = [n for n, _ in model.named_parameters() if "pooler" not in n.split(".")]
    if train == "all":
        return set(names)
    if train == "none" or train == 0:
        return set()
    layers, count = layer_list(model)
    if train > count:
        raise ConfigError(f"{WHERE}.train: {train} top layers asked for, the model has {count} (in {layers})")
    top = tuple(f"{layers}.{i}." for i in range(count - int(train), count))
    inside = [i for i, n in enumerate(names) if n.startswith(f"{layers}.")]
    return {n for i, n in enumerate(names) if n.startswith(top) or i > max(inside)}


def _with_lora(model: nn.Module, lora: LoraParams) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules)
    try:
        with _quiet():
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"{WHERE}.lora: {e}".rstrip() + " (set lora.target_modules to the names of the linear "
                          "modules to adapt)") from None


@BACKBONES.register("hf", params=HFParams, summary="a Hugging Face transformers encoder from a local directory: "
                    "frozen, top-N layers, all, or LoRA; mean or CLS pooling", paper="Hu et al. 2021 (LoRA)")
def hf(params: HFParams, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ConfigError(f"model.backbone: hf reads token ids and attention masks, shape (2, L), as the text suite "
                          f"gives; got inputs of shape {tuple(input_shape)}")
    path = model_dir(params.path, f"{WHERE}.path")
    from transformers import AutoModel

    try:
        with _quiet():
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{WHERE}.path: cannot load a transformers model from {path}: {e}") from None
    keep = trainable(model, params.train)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    if params.lora is not None:
        model = _with_lora(model, params.lora)
        for name, p in model.named_parameters():
            if "pooler" in name.split("."):
                p.requires_grad_(False)
    hidden = getattr(model.config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise ConfigError(f"{WHERE}.path: {path}/config.json names no hidden_size")
    return HFEncoder(model, params.pooling), hidden
