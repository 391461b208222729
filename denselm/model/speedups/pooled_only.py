"""The last block's MLP only at the tokens that are pooled.

With last-token (or first-token) pooling, the output of the last block is read
at one position per sequence, and nothing after the last block mixes positions
(only the per-token final norm).  Its attention still needs every position's
keys and values, which come from the block's *input*, but its MLP, the biggest
matmuls of a block (e.g. 73% of the CPU benchmark model's linear FLOPs), is only
needed at the pooled tokens.  Computing it there alone removes up to
``mlp_share / num_layers`` of the FLOPs (18% for a 4-layer model, 2% for 32).  In
training it measured less than that share: 1.02x on the 4 LoRA blocks of a cached demo
step (``benchmarks/train_bench.py --recipes demo --layers 4 --variants
seed,denselm,denselm-full-mlp``: 2,777 vs 2,711 real tokens/s, ranges overlapping).

Encoding and training alike: the other positions of the last hidden state are
left at the MLP's residual input, and nothing reads them (the pooling reads the
pooled rows, the loss reads the pooling), so the embeddings and every gradient
are those of the full computation.  Not when the last block is gradient-
checkpointed in training: its recompute in backward would run the MLP outside
this scope, at every position, and no longer match what the forward saved.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..backbone import decoder_layers
from .common import swapped


def _last_mlp(backbone: nn.Module) -> nn.Module | None:
    try:
        layers = decoder_layers(backbone)
    except ValueError:
        return None
    return getattr(layers[-1], "mlp", None) if len(layers) else None


def _last_block_checkpointed(backbone: nn.Module) -> bool:
    """The last block recomputes its forward in backward (transformers' gradient checkpointing)."""
    block = decoder_layers(backbone)[-1]
    return bool(getattr(block, "gradient_checkpointing", False)) and block.training


_switched_off = 0  # > 0 inside full_last_block(): the shortcut is a no-op


@contextlib.contextmanager
def full_last_block():
    """Within the context the last block runs in full (the reference the shortcut is measured against)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


@contextlib.contextmanager
def last_mlp_only_at(backbone: nn.Module, positions: torch.Tensor | None):
    """Within the context the last block's MLP runs only where ``positions`` (b, t) bool is True.

    ``positions`` None (pooling that reads every token) makes it a no-op.  A call whose
    input layout differs from ``positions`` (an unexpected architecture) runs in full, so
    the shortcut can only ever save work, never change a pooled value.
    """
    mlp = _last_mlp(backbone) if positions is not None else None
    if mlp is None or _switched_off or (torch.is_grad_enabled() and _last_block_checkpointed(backbone)):
        yield
        return
    original = mlp.forward  # the class's forward, bound

    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape[:-1] != positions.shape:
            return original(hidden_states, *args, **kwargs)
        where = positions.to(hidden_states.device)
        selected = original(hidden_states[where], *args, **kwargs)  # (n, D): the pooled tokens only
        out = selected.new_zeros(hidden_states.shape[:-1] + selected.shape[-1:])
        out[where] = selected
        return out

    with swapped(mlp, "forward", forward):
        yield


def pooled_positions(attention_mask: torch.Tensor, pooling: str) -> torch.Tensor | None:
    """(B, T) bool: the token each row is pooled at, or None when pooling reads every token."""
    from ..pooling import first_token_indices, last_token_indices

    if pooling == "last":
        index = last_token_indices(attention_mask)
    elif pooling == "first":
        index = first_token_indices(attention_mask)
    else:
        return None
    positions = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    positions[torch.arange(attention_mask.shape[0], device=attention_mask.device), index] = True
    return positions


def packed_positions(cu_seqlens: torch.Tensor, total: int, pooling: str) -> torch.Tensor | None:
    """(1, total) bool for a packed row: each sequence's last (or first) token."""
    if pooling not in ("last", "first"):
        return None
    cu = cu_seqlens.to(torch.long)
    index = cu[1:] - 1 if pooling == "last" else cu[:-1]
    positions = torch.zeros(1, total, dtype=torch.bool, device=cu.device)
    positions[0, index] = True
    return positions
