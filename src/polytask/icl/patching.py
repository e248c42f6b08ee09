"""Reading and writing a causal LM's residual stream at chosen positions, through forward hooks on its decoder blocks.

The plumbing under :mod:`polytask.icl.representations` (task vectors, learnable task representations): it works on
any Hugging Face causal LM (GPT-2's ``transformer.h``, Llama's ``model.layers``, ... found generically as the
``ModuleList`` with one entry per hidden layer) and on any module whose blocks it can find that way.

Layer ``L`` (0-based) means the residual stream *after* decoder block ``L``, before the model's final norm (Hendel et
al. 2023's ``hidden_states[L + 1]``, read with a hook here because Hugging Face applies the final norm to the last
entry of ``hidden_states``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError

OUT_PROJECTIONS = ("attn.c_proj", "self_attn.o_proj", "attn.out_proj", "attention.dense", "self_attention.dense",
                   "attn.o_proj")
"""Names (suffixes inside a decoder block) of the attention output projection: GPT-2, Llama/Mistral/Qwen, GPT-J,
GPT-NeoX, Falcon/Bloom, OLMo-style."""


def load_causal_lm(model_dir: str | Path) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(model_dir)`` in eval mode with gradients off (a local directory only:
    nothing is downloaded)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError("polytask.icl task representations need transformers: pip install 'polytask[hf]'") from e
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model_dir: {str(path)!r} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model


def num_layers(model: nn.Module) -> int:
    """The number of decoder blocks (``config.num_hidden_layers`` of the text config)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"model config {type(config).__name__} has no num_hidden_layers")
    return n


def num_heads(model: nn.Module) -> int:
    """The number of attention heads per block (``config.num_attention_heads``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"model config {type(config).__name__} has no num_attention_heads")
    return n


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the first ``ModuleList`` (in module order) with ``num_layers(model)`` entries."""
    n = num_layers(model)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"{type(model).__name__}: no ModuleList of {n} decoder blocks found")


def out_projection(block: nn.Module) -> nn.Module:
    """The attention output projection inside one decoder block (its input is the heads' outputs side by side)."""
    modules = dict(block.named_modules())
    for name in OUT_PROJECTIONS:
        if name in modules:
            return modules[name]
    raise ConfigError(f"{type(block).__name__}: no attention output projection among {', '.join(OUT_PROJECTIONS)}")


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _rows(positions: Tensor) -> Tensor:
    return torch.arange(positions.shape[0], device=positions.device)


@contextmanager
def _hooks(modules: Sequence[nn.Module], hooks: Sequence[Any], pre: bool = False) -> Iterator[None]:
    handles = [(m.register_forward_pre_hook(h) if pre else m.register_forward_hook(h))
               for m, h in zip(modules, hooks, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits_at(model: nn.Module, tokens: Tensor, positions: Tensor) -> Tensor:
    """The next-token logits (B x V) at ``positions`` (B) of ``tokens`` (B x L), one forward pass."""
    logits = model(input_ids=tokens).logits
    return logits[_rows(positions), positions]


def residual_at(model: nn.Module, tokens: Tensor, positions: Tensor, layers: Sequence[int] | None = None
                ) -> tuple[Tensor, Tensor]:
    """One forward pass: the residual stream after each of ``layers`` (default all) at ``positions``
    (len(layers) x B x d) and the logits at ``positions`` (B x V)."""
    blocks = decoder_blocks(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    rows = _rows(positions)
    read: dict[int, Tensor] = {}

    def reader(layer: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            read[layer] = _hidden(output)[rows, positions]
        return hook

    with _hooks([blocks[i] for i in layers], [reader(i) for i in layers]):
        logits = logits_at(model, tokens, positions)
    return torch.stack([read[i] for i in layers]), logits


@contextmanager
def patched(model: nn.Module, edits: dict[int, Tensor], positions: Tensor, add: bool = False) -> Iterator[None]:
    """Within the block, every forward pass writes ``edits[L]`` (B x d, or d for every row) into the residual stream
    after block ``L`` at ``positions`` (B): replacing it (Hendel et al. 2023's injection) or, with ``add``, adding
    to it (Saglam et al. 2025's learnable task vector). Differentiable in the edits."""
    blocks = decoder_blocks(model)
    rows = _rows(positions)

    def writer(vector: Tensor):
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            hidden = _hidden(output)
            value = vector.to(hidden.dtype).expand(rows.shape[0], hidden.shape[-1])
            return _replace(output, hidden.index_put((rows, positions), value, accumulate=add))
        return hook

    for layer in edits:
        if not 0 <= layer < len(blocks):
            raise ConfigError(f"layer {layer} is out of range: the model has {len(blocks)} decoder blocks")
    with _hooks([blocks[i] for i in edits], [writer(v) for v in edits.values()]):
        yield


def head_contributions(model: nn.Module, tokens: Tensor, positions: Tensor) -> Tensor:
    """Each attention head's write into the residual stream at ``positions``, averaged over the B prompts:
    n_layers x n_heads x d, ``out_proj(a masked to head h) - out_proj(0)`` (the output projection's bias is not
    a head's; the heads' contributions plus the bias sum to the attention output). As Todd et al. 2024's function
    vectors and Saglam et al. 2025's attention-head activations, read at the last (query) token."""
    blocks = decoder_blocks(model)
    heads = num_heads(model)
    projections = [out_projection(b) for b in blocks]
    rows = _rows(positions)
    read: dict[int, Tensor] = {}

    def reader(layer: int):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            read[layer] = args[0][rows, positions].mean(dim=0)
        return hook

    with torch.no_grad():
        with _hooks(projections, [reader(i) for i in range(len(blocks))], pre=True):
            model(input_ids=tokens)
        out = []
        for layer, projection in enumerate(projections):
            a = read[layer]
            width = a.shape[-1] // heads
            masked = torch.zeros(heads, a.shape[-1], dtype=a.dtype, device=a.device)
            for h in range(heads):
                masked[h, h * width:(h + 1) * width] = a[h * width:(h + 1) * width]
            out.append(projection(masked) - projection(torch.zeros_like(a))[None])
    return torch.stack(out)
