"""Hugging Face-style model directories with random weights, built tensor by tensor without transformers.

For tests, benchmarks and examples: a Llama-layout decoder (the tensor names and shapes
``transformers.LlamaForCausalLM`` saves) with a base and fine-tuned variants that differ from it by small
seeded perturbations, written as ``config.json`` + (sharded) safetensors + minimal tokenizer files. Each
tensor is generated from its own seed, so building N variants never holds a whole model in memory.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import Tensor

from polytask.merging.writer import ShardedWriter


def llama_layout(layers: int, hidden: int, intermediate: int, vocab: int, kv_heads_ratio: int = 1
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama-layout causal LM (untied embeddings)."""
    kv = hidden // kv_heads_ratio
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int = 4) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu",
    }


def _gen(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("\0".join(map(str, (seed, *parts))).encode()))


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> Tensor:
    """The base model's tensor ``name``: ones for norms, N(0, 0.02) otherwise."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=_gen(seed, "base", name)) * 0.02


def variant_tensor(name: str, shape: tuple[int, ...], seed: int, k: int, scale: float = 0.002) -> Tensor:
    """Fine-tuned variant ``k``: the base plus a seeded perturbation of std ``scale``."""
    t = base_tensor(name, shape, seed)
    return t.add_(torch.randn(shape, generator=_gen(seed, "variant", k, name)), alpha=scale)


def write_model_dir(path: str | Path, layout: list[tuple[str, tuple[int, ...]]], make: object, config: dict,
                    dtype: torch.dtype = torch.float32, shard_bytes: int = 2 * 10**9, tokenizer: bool = True) -> Path:
    """Write a model directory: ``make(name, shape) -> Tensor`` is called once per tensor, in order."""
    with ShardedWriter(path, [(n, dtype, s) for n, s in layout], shard_bytes, fsync=False) as w:
        for name, shape in layout:
            w.write(name, make(name, shape).to(dtype).contiguous())  # type: ignore[operator]
        w.add_file("config.json", (json.dumps({**config, "torch_dtype": str(dtype).removeprefix("torch.")},
                                              indent=2) + "\n").encode())
        if tokenizer:
            vocab = {f"t{i}": i for i in range(int(config.get("vocab_size", 0)))}
            tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
            w.add_file("tokenizer.json", json.dumps(tok).encode())
            w.add_file("tokenizer_config.json", json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}).encode())
        return w.commit()


def make_model_family(root: str | Path, n: int, *, layers: int = 2, hidden: int = 64, intermediate: int = 128,
                      vocab: int = 256, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 0.002,
                      shard_bytes: int = 2 * 10**9) -> tuple[Path, list[Path]]:
    """A base model and ``n`` perturbed variants as HF directories under ``root`` (base, ft0, ft1, ...)."""
    root = Path(root)
    layout = llama_layout(layers, hidden, intermediate, vocab)
    config = llama_config(layers, hidden, intermediate, vocab)
    base = write_model_dir(root / "base", layout, lambda nm, sh: base_tensor(nm, sh, seed), config, dtype,
                           shard_bytes)
    variants = [write_model_dir(root / f"ft{k}", layout,
                                lambda nm, sh, k=k: variant_tensor(nm, sh, seed, k, scale), config, dtype, shard_bytes)
                for k in range(n)]
    return base, variants
