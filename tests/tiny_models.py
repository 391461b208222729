"""Tiny random-init decoders (2 layers, width 64) and random batches, for tests and benchmarks."""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2")
VOCAB = 128


def tiny_config(arch: str, vocab_size: int = VOCAB, layers: int = 2, hidden: int = 64, dropout: float = 0.0):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=dropout,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(arch)


def tiny_backbone(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **kw):
    from transformers import AutoModel

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = AutoModel.from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype)


def random_lengths(n: int, lo: int, hi: int, generator: torch.Generator) -> list[int]:
    return torch.randint(lo, hi + 1, (n,), generator=generator).tolist()


def random_batch(n: int, lo: int, hi: int, seed: int, padding_side: str = "left", eos_id: int = 2, vocab: int = VOCAB):
    """Random token rows of lengths in [lo, hi], each ending in EOS, padded to the batch max."""
    from denselm.data.tokenize import pad_batch

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for length in random_lengths(n, lo, hi, g):
        body = torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        seqs.append(body + [eos_id])
    return pad_batch(seqs, pad_id=0, padding_side=padding_side), seqs


def make_model_dir(path, arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny model folder (config + safetensors + the tiny BPE tokenizer of data_helpers)."""
    from data_helpers import make_tokenizer

    tok = make_tokenizer()
    model = tiny_backbone(arch, dtype=dtype, seed=seed, vocab_size=len(tok))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
