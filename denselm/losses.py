"""Contrastive and distillation losses: pure functions on embeddings and scores.

Notation: B queries (this process), G = group size (1 positive then G - 1
negatives per query), D = embedding width, N = total passages the queries are
scored against (B * G on one process; W * B * G with cross-device negatives).

``q`` (B, D); ``p`` (N, D) in group order: passage ``j`` belongs to query
``j // G``, and query ``i``'s positive sits at ``(offset + i) * G`` where
``offset`` is the global index of this process's first query (0 on one process).

Every loss is a mean over this process's queries.  With cross-device
negatives each process scores its own queries against everybody's passages,
so the per-process losses average (DDP's gradient averaging) to exactly the
global-batch loss: no world-size factor to fix afterwards (see distributed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = {"normal": "normal", "custom": "custom", "not in-batch": "custom"}


def similarity(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """All-pairs inner products (B, N), computed in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, p.dtype), torch.float32)
    return q.to(dtype) @ p.to(dtype).T


def group_scores(q: torch.Tensor, p: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each query against its own group only: (B, G), one batched matmul.

    ``p`` here holds exactly this process's B * G passages.  Never builds the
    (B, B * G) matrix.
    """
    B, D = q.shape
    if p.shape[0] != B * group_size:
        raise ValueError(f"group_scores: {p.shape[0]} passages for {B} queries x group {group_size}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, p.dtype), torch.float32)
    groups = p.to(dtype).view(B, group_size, D)  # (B, G, D)
    return torch.bmm(groups, q.to(dtype).unsqueeze(-1)).squeeze(-1)  # (B, G)


def in_batch_contrastive_loss(
    scores: torch.Tensor,
    group_size: int,
    query_offset: int = 0,
    false_negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over all passages; query i's target is its positive at (offset + i) * G.

    ``scores`` (B, N), already divided by the temperature.  ``false_negative_mask``
    (B, N) bool: True where a passage must not count as a negative for that
    query (a duplicate of its positive); those logits are removed from the
    softmax.  The target position is never masked.
    """
    B = scores.shape[0]
    target = (torch.arange(B, device=scores.device) + query_offset) * group_size  # (B,)
    if false_negative_mask is not None:
        if false_negative_mask.shape != scores.shape:
            raise ValueError(
                f"false_negative_mask has shape {tuple(false_negative_mask.shape)}, scores {tuple(scores.shape)}"
            )
        mask = false_negative_mask.to(scores.device, torch.bool).clone()
        mask[torch.arange(B, device=scores.device), target] = False
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, target)


def local_contrastive_loss(local_scores: torch.Tensor, false_negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """"custom" mode: cross-entropy over each query's own group, target 0. ``local_scores`` (B, G)."""
    if false_negative_mask is not None:
        mask = false_negative_mask.to(local_scores.device, torch.bool).clone()
        mask[:, 0] = False
        local_scores = local_scores.masked_fill(mask, torch.finfo(local_scores.dtype).min)
    target = torch.zeros(local_scores.shape[0], dtype=torch.long, device=local_scores.device)
    return F.cross_entropy(local_scores, target)


def distillation_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    teacher_temperature: float = 1.0,
    kind: str = "soft_ce",
) -> torch.Tensor:
    """Match the teacher's ranking distribution over each query's group.

    ``student_scores`` (B, G): the student's group scores (already over its
    temperature); ``teacher_scores`` (B, G) raw teacher scores, divided here by
    ``teacher_temperature`` (cosine scores squeezed into [0, 1] give a near
    uniform softmax at temperature 1: use 0.02-0.05 for them).

    ``soft_ce`` (the seed's): -sum_j softmax(t)_j * log_softmax(s)_j, mean over queries.
    ``kl``: the same minus the teacher's entropy (identical gradients, loss 0 at a perfect match).
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"teacher_scores shape {tuple(teacher_scores.shape)} does not match student {tuple(student_scores.shape)}"
        )
    t = teacher_scores.detach().to(student_scores.dtype) / teacher_temperature
    log_student = F.log_softmax(student_scores, dim=-1)
    if kind == "soft_ce":
        return -(F.softmax(t, dim=-1) * log_student).sum(dim=-1).mean()
    if kind == "kl":
        return F.kl_div(log_student, F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    raise ValueError(f"distillation kind must be 'soft_ce' or 'kl', got {kind!r}")


def teacher_entropy_ratio(teacher_scores: torch.Tensor, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(teacher / T) over each group divided by log(G): 1.0 = uniform (useless). (B,)"""
    probs = F.softmax(teacher_scores.float() / teacher_temperature, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return entropy / torch.log(torch.tensor(float(teacher_scores.shape[-1])))
