"""Losses are pure functions; checked against direct formulas."""

import pytest
import torch
import torch.nn.functional as F

from denselm import losses


def test_group_scores_equal_block_diagonal_of_full_matrix():
    torch.manual_seed(0)
    q, p = torch.randn(3, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    full = q @ p.T
    local = losses.group_scores(q, p, 4)
    expected = torch.stack([full[i, 4 * i : 4 * i + 4] for i in range(3)])
    torch.testing.assert_close(local, expected)
    with pytest.raises(ValueError, match="passages for 3 queries"):
        losses.group_scores(q, p[:10], 4)


def test_in_batch_target_offset():
    scores = torch.randn(2, 12, dtype=torch.float64)
    loss = losses.in_batch_contrastive_loss(scores, group_size=3, query_offset=2)
    expected = F.cross_entropy(scores, torch.tensor([6, 9]))
    torch.testing.assert_close(loss, expected)


def test_distillation_soft_ce_and_kl_differ_by_teacher_entropy():
    torch.manual_seed(1)
    s, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ce = losses.distillation_loss(s, t, 0.5, "soft_ce")
    kl = losses.distillation_loss(s, t, 0.5, "kl")
    pt = F.softmax(t / 0.5, -1)
    entropy = -(pt * pt.log()).sum(-1).mean()
    torch.testing.assert_close(ce - kl, entropy)
    assert losses.distillation_loss(t, t * 1.0, 1.0, "kl").abs() < 1e-12


def test_teacher_entropy_ratio_flags_squeezed_scores():
    squeezed = torch.tensor([[0.61, 0.60, 0.59, 0.58]])
    assert losses.teacher_entropy_ratio(squeezed, 1.0).item() > 0.999
    assert losses.teacher_entropy_ratio(squeezed, 0.002).item() < 0.9


def test_local_loss_mask_never_masks_positive():
    scores = torch.tensor([[1.0, 3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    loss = losses.local_contrastive_loss(scores, mask)
    torch.testing.assert_close(loss, F.cross_entropy(scores[:, [0, 2]], torch.tensor([0])))
