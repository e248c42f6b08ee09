"""A tiny randomly initialised BERT and its tokenizer, saved as a local Hugging Face directory (no download)."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "a", "was", "is", "not", "and", "really", "very", "quite", "fairly", "match", "team", "goal", "album",
         "song", "band", "movie", "actor", "scene", "great", "wonderful", "excellent", "awful", "boring", "terrible"]


def write_tiny_bert(path: Path, layers: int = 2, seed: int = 0) -> Path:
    """BERT with hidden size 32, ``layers`` layers of 2 heads, a word-level vocabulary of ``WORDS`` (others are
    [UNK]), saved with its tokenizer into ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    return path
