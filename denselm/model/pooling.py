"""Pooling: pure functions from per-token hidden states to one vector per sequence.

All of them read the attention mask, never the pad id (for Qwen3 pad == eos),
and work for left padding, right padding or any mix of the two in one batch.

Shapes: ``hidden`` (B, T, D), ``attention_mask`` (B, T) with 1 on real tokens;
results (B, D).  Packed (padding-free) batches use ``pool_packed`` instead.
"""

from __future__ import annotations

import torch

from ..spec import POOLINGS as POOLING_METHODS  # the one list of pooling kinds


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, (B,) long.

    ``flip`` + ``argmax`` finds the first 1 from the right per row, so it is
    correct for left padding (always T - 1), right padding (length - 1) and
    masks with holes; a batch-wide guess (the seed's position -1) is only
    right for left padding.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    T = attention_mask.shape[1]
    from_right = attention_mask.flip(dims=[1]).to(torch.int8).argmax(dim=1)  # (B,)
    return (T - 1) - from_right


def first_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's first real token, (B,) long."""
    return attention_mask.to(torch.int8).argmax(dim=1)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's last real token (the EOS our tokenizer appends). (B, D)"""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_indices(attention_mask).to(hidden.device)]


def first_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's first real token. (B, D)"""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, first_token_indices(attention_mask).to(hidden.device)]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of real tokens. (B, D)

    Summed in float32 at least: bf16 sums over hundreds of tokens lose digits.
    """
    mask = attention_mask.to(hidden.device).unsqueeze(-1)  # (B, T, 1)
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    summed = (hidden.to(acc_dtype) * mask.to(acc_dtype)).sum(dim=1)  # (B, D)
    counts = mask.sum(dim=1).clamp(min=1).to(acc_dtype)  # (B, 1)
    return (summed / counts).to(hidden.dtype)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str = "last") -> torch.Tensor:
    """Dispatch on ``method`` in POOLING_METHODS."""
    if method == "last":
        return last_token_pool(hidden, attention_mask)
    if method == "mean":
        return mean_pool(hidden, attention_mask)
    if method == "first":
        return first_token_pool(hidden, attention_mask)
    raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {method!r}")


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str = "last") -> torch.Tensor:
    """Pooling for packed rows: ``hidden`` (1, total, D) or (total, D); ``cu_seqlens`` (N + 1,).

    Sequence n occupies tokens ``cu_seqlens[n] : cu_seqlens[n + 1]``. Returns (N, D).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    starts, ends = cu_seqlens[:-1].to(flat.device), cu_seqlens[1:].to(flat.device)
    if method == "last":
        return flat[ends - 1]
    if method == "first":
        return flat[starts]
    if method == "mean":
        lengths = (ends - starts).to(torch.float32)
        seq_ids = torch.repeat_interleave(torch.arange(len(starts), device=flat.device), ends - starts)
        acc_dtype = torch.promote_types(flat.dtype, torch.float32)
        summed = torch.zeros(len(starts), flat.shape[-1], dtype=acc_dtype, device=flat.device)
        summed.index_add_(0, seq_ids, flat.to(acc_dtype))
        return (summed / lengths.unsqueeze(-1).to(acc_dtype)).to(flat.dtype)
    raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {method!r}")
