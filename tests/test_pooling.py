"""Pooling picks each row's own tokens for left, right and mixed padding."""

import pytest
import torch

from denselm.model.pooling import (
    first_token_indices, last_token_indices, last_token_pool, mean_pool, pool, pool_packed,
)

MASK = torch.tensor([
    [0, 0, 1, 1, 1],  # left padded
    [1, 1, 1, 0, 0],  # right padded
    [1, 1, 1, 1, 1],  # full
    [0, 1, 0, 0, 0],  # one token, both sides
])


def test_indices():
    assert last_token_indices(MASK).tolist() == [4, 2, 4, 1]
    assert first_token_indices(MASK).tolist() == [2, 0, 0, 1]


def test_last_mean_first_by_hand():
    hidden = torch.arange(4 * 5 * 2, dtype=torch.float32).view(4, 5, 2)
    last = last_token_pool(hidden, MASK)
    assert last.tolist() == [hidden[0, 4].tolist(), hidden[1, 2].tolist(), hidden[2, 4].tolist(), hidden[3, 1].tolist()]
    mean = mean_pool(hidden, MASK)
    torch.testing.assert_close(mean[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(mean[1], hidden[1, :3].mean(0))
    torch.testing.assert_close(mean[3], hidden[3, 1])
    first = pool(hidden, MASK, "first")
    torch.testing.assert_close(first[0], hidden[0, 2])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(hidden, MASK, "cls")


def test_packed_matches_padded():
    torch.manual_seed(0)
    lengths = [3, 1, 4]
    hidden_rows = [torch.randn(n, 6) for n in lengths]
    packed = torch.cat(hidden_rows)[None]  # (1, total, D)
    cu = torch.tensor([0, 3, 4, 8])
    padded = torch.zeros(3, 4, 6)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for i, h in enumerate(hidden_rows):
        padded[i, 4 - len(h):] = h
        mask[i, 4 - len(h):] = 1
    for method in ("last", "mean", "first"):
        torch.testing.assert_close(pool_packed(packed, cu, method), pool(padded, mask, method))
