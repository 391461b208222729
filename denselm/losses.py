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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = {"normal": "normal", "custom": "custom", "not in-batch": "custom"}


def similarity(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """All-pairs inner products (B, N), computed in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, p.dtype), torch.float32)
    return q.to(dtype) @ p.to(dtype).T


def cosine_similarities(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """All-pairs cosines (B, N) of rows of any width (a teacher's and a student's may differ)."""
    return similarity(F.normalize(q, dim=-1), F.normalize(p, dim=-1))


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


# ----------------------------------------------------------- negatives, right
# Options of the contrastive loss beyond the seed (all off by default).  Names
# follow sentence-transformers' MultipleNegativesRankingLoss (v6) so a user can
# move a setting across: ``directions``, ``partition_mode``, ``hardness_mode``,
# ``hardness_strength``.

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


def positive_columns(num_queries: int, group_size: int, query_offset: int = 0, device=None) -> torch.Tensor:
    """(B,) column of each query's positive among the (gathered) passages: (offset + i) * G."""
    return (torch.arange(num_queries, device=device) + query_offset) * group_size


def margin_mask(similarities: torch.Tensor, positive: torch.Tensor, margin: float) -> torch.Tensor:
    """The Qwen3-Embedding rule: True where s_ij > s_i+ + margin (too close to the positive to be a negative).

    ``similarities`` (B, M) raw similarities (cosine, or dot when not
    normalised: before any temperature); ``positive`` (B,) s_i+.  No gradient
    flows through a mask.  (B, M) bool.
    """
    return similarities.detach() > positive.detach().unsqueeze(1) + margin


def teacher_margin_mask(
    teacher_scores: torch.Tensor, margin: float, num_columns: int, query_offset: int = 0
) -> torch.Tensor:
    """The margin rule on the teacher's scale: (B, N) bool, True on own-group negatives the teacher
    scores above its positive plus ``margin``.

    ``teacher_scores`` (B, G) raw (not divided by any temperature), positive first.
    Teacher scores exist only for a query's own group, so other columns stay False.
    """
    B, G = teacher_scores.shape
    t = teacher_scores.detach()
    own = t > t[:, :1] + margin  # (B, G)
    mask = torch.zeros(B, num_columns, dtype=torch.bool, device=t.device)
    cols = positive_columns(B, G, query_offset, t.device).unsqueeze(1) + torch.arange(G, device=t.device)  # (B, G)
    return mask.scatter(1, cols, own)


def masked_fraction(mask: torch.Tensor, positive_cols: torch.Tensor) -> float:
    """Fraction of the negatives (every column but each row's positive) that ``mask`` (B, N) removes."""
    B, N = mask.shape
    if N <= 1:
        return 0.0
    hits = mask.sum() - mask[torch.arange(B, device=mask.device), positive_cols.to(mask.device)].sum()
    return float(hits) / (B * (N - 1))


@dataclass
class ContrastiveResult:
    loss: torch.Tensor
    """Scalar: mean over this process's queries."""
    scores: torch.Tensor
    """(B, N) query-to-passage similarities / temperature, unmasked, without hardness terms."""
    masks: dict[str, torch.Tensor]
    """(B, N) bool per mask applied to the query-to-passage scores (positive column False)."""


def extended_contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    group_size: int,
    temperature: float = 1.0,
    query_offset: int = 0,
    all_q: torch.Tensor | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    margin: float | None = None,
    directions: tuple[str, ...] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> ContrastiveResult:
    """InfoNCE with composable false-negative masks, the GTE/Qwen3 extra terms and hardness weighting.

    Shapes: ``q`` (B, D) this process's queries; ``p`` (N, D) every passage
    scored against (gathered under cross-device negatives), group order;
    ``all_q`` (Q, D) every query (gathered; defaults to ``q``), this process's
    at rows ``query_offset .. query_offset + B``.  Query i's positive is p[t_i],
    t_i = (query_offset + i) * G, and d_i = p[t_i].

    Logits of row i (s = similarity, tau = temperature), each term switchable:
      query_to_doc    s(q_i, p_j) / tau        over all N passages (always on: holds the positive)
      query_to_query  s(q_i, q_k) / tau        k != i
      doc_to_query    s(q_k, d_i) / tau        over all Q queries
      doc_to_doc      s(d_i, p_j) / tau        p_j outside query i's own group
    ``partition_mode`` "joint": one softmax over every chosen term; "per_direction":
    one per term, log-normalisers averaged (only with query_to_doc / doc_to_query,
    whose pools hold the positive).  Exactly sentence-transformers'
    MultipleNegativesRankingLoss (scale = 1 / tau) when no mask is given.

    Masks (each True = "not a negative for this query", OR-ed; the positive is
    never masked): ``masks`` (B, N) over passages (duplicates of the positive,
    same document id, teacher margin), plus ``margin``: s_ij > s_i+ + margin on
    raw similarities (margin_mask), applied to every term.  Passage masks apply to
    the passage-indexed terms (query_to_doc, doc_to_doc); for the query-indexed
    terms query k is masked for row i when k's positive is masked for i.

    Hardness weighting (LLaVE, Lan et al. 2025, eq. 5): a negative's term in the
    denominator is multiplied by exp(hardness_strength * s_ij), s_ij detached and
    on the raw scale, i.e. ``hardness_strength * sg(s_ij)`` is added to its logit:
    harder negatives weigh more.  ``hardness_mode`` picks which query-to-passage
    negatives: "in_batch_negatives" (other queries' passages), "hard_negatives"
    (the own group's negatives), "all_negatives" (both); None = off.
    """
    directions = tuple(directions)
    if "query_to_doc" not in directions or not set(directions) <= set(DIRECTIONS):
        raise ValueError(f"directions must include 'query_to_doc' and be among {DIRECTIONS}, got {directions}")
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {partition_mode!r}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode 'per_direction' only works with query_to_doc and doc_to_query")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES} or None, got {hardness_mode!r}")
    B, N, G = q.shape[0], p.shape[0], group_size
    device = q.device
    all_q = q if all_q is None else all_q
    rows = torch.arange(B, device=device)
    target = positive_columns(B, G, query_offset, device)  # (B,)
    raw = similarity(q, p)  # (B, N) before the temperature
    pos_raw = raw[rows, target]  # (B,) s_i+

    applied: dict[str, torch.Tensor] = {}
    for name, m in (masks or {}).items():
        if m is None:
            continue
        if m.shape != raw.shape:
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, scores {tuple(raw.shape)}")
        applied[name] = m.to(device, torch.bool)
    if margin is not None:
        applied["margin"] = margin_mask(raw, pos_raw, margin)
    passage_mask = torch.zeros_like(raw, dtype=torch.bool)
    for m in applied.values():
        passage_mask |= m
    passage_mask[rows, target] = False
    for name in applied:
        applied[name] = applied[name].clone()
        applied[name][rows, target] = False
    # (B, Q): query k masked for row i when k's positive is (own row: kept, handled per term)
    query_mask = passage_mask[:, torch.arange(all_q.shape[0], device=device) * G]
    floor = torch.finfo(raw.dtype).min

    logits: dict[str, torch.Tensor] = {}
    qd = raw / temperature
    if hardness_mode is not None and hardness_strength > 0:
        own = (torch.arange(N, device=device).unsqueeze(0) // G) == (rows + query_offset).unsqueeze(1)  # (B, N)
        penalised = {"in_batch_negatives": ~own, "hard_negatives": own, "all_negatives": torch.ones_like(own)}[hardness_mode]
        penalised = penalised.clone()
        penalised[rows, target] = False
        qd = qd + hardness_strength * raw.detach() * penalised
    positive_logit = qd[rows, target]  # (B,)
    logits["query_to_doc"] = qd.masked_fill(passage_mask, floor)
    if "query_to_query" in directions:
        raw_qq = similarity(q, all_q)  # (B, Q)
        mask = query_mask.clone()
        if margin is not None:
            mask |= margin_mask(raw_qq, pos_raw, margin)
        mask[rows, rows + query_offset] = True  # q_i is not its own negative
        logits["query_to_query"] = (raw_qq / temperature).masked_fill(mask, floor)
    if "doc_to_query" in directions:
        raw_dq = similarity(p[target], all_q)  # (B, Q): s(q_k, d_i)
        mask = query_mask.clone()
        if margin is not None:
            mask |= margin_mask(raw_dq, pos_raw, margin)
        mask[rows, rows + query_offset] = False  # s(q_i, d_i) is the positive pair itself
        logits["doc_to_query"] = (raw_dq / temperature).masked_fill(mask, floor)
    if "doc_to_doc" in directions:
        raw_dd = similarity(p[target], p)  # (B, N): s(d_i, p_j)
        mask = passage_mask.clone()
        if margin is not None:
            mask |= margin_mask(raw_dd, pos_raw, margin)
        own_group = (torch.arange(N, device=device).unsqueeze(0) // G) == (rows + query_offset).unsqueeze(1)
        logits["doc_to_doc"] = (raw_dd / temperature).masked_fill(mask | own_group, floor)

    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)  # (B,)
    else:
        log_z = torch.stack([torch.logsumexp(v, dim=1) for v in logits.values()]).mean(0)
    loss = (log_z - positive_logit).mean()
    return ContrastiveResult(loss=loss, scores=raw / temperature, masks=applied)


@dataclass(frozen=True)
class LossOptions:
    """The contrastive options beyond the seed, as the model's forward passes them to the losses.

    Defaults reproduce the seed's loss (and the model then takes the seed's code path).
    """

    margin: float | None = None
    """Mask in-batch passages scoring above the positive + margin (raw similarity); None = off."""
    teacher_margin: float | None = None
    """Mask own-group negatives the teacher scores above its positive + this (teacher's scale); None = off."""
    directions: tuple[str, ...] = ("query_to_doc",)
    """Terms of the softmax denominator (see extended_contrastive_loss)."""
    partition_mode: str = "joint"
    """joint (one softmax) or per_direction."""
    hardness_mode: str | None = None
    """in_batch_negatives, hard_negatives, all_negatives or None."""
    hardness_strength: float = 0.0
    """alpha of the hardness weights exp(alpha * s)."""

    def __post_init__(self):
        object.__setattr__(self, "directions", tuple(self.directions))
        if "query_to_doc" not in self.directions or not set(self.directions) <= set(DIRECTIONS):
            raise ValueError(f"directions must include 'query_to_doc' and be among {DIRECTIONS}, got {self.directions}")
        if self.partition_mode not in PARTITION_MODES:
            raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {self.partition_mode!r}")
        if self.partition_mode == "per_direction" and set(self.directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError("partition_mode per_direction only works with query_to_doc and doc_to_query")
        if self.hardness_mode is not None and self.hardness_mode not in HARDNESS_MODES:
            raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES} or None, got {self.hardness_mode!r}")
        if self.hardness_strength < 0:
            raise ValueError(f"hardness_strength must be >= 0, got {self.hardness_strength}")

    @property
    def is_default(self) -> bool:
        return self == LossOptions()

    @property
    def needs_all_queries(self) -> bool:
        """The query-indexed terms need every process's queries (gathered with gradients)."""
        return bool(set(self.directions) & {"query_to_query", "doc_to_query"})


# ------------------------------------------------------- embedding distillation
EMBED_DISTANCES = ("cosine", "mse", "l2")


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Distance between (projected) student embeddings and the teacher's, mean over rows. (n, Dt) each.

    ``cosine``: 1 - cos (bounded; sentence-transformers' EmbedDistillLoss default),
    ``mse``: mean squared error per coordinate, ``l2``: Euclidean distance (EmbedDistill).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {tuple(student.shape)} vs teacher {tuple(teacher.shape)}: "
                         "project the student to the teacher's width first")
    t = teacher.detach().to(student.dtype)
    if distance == "cosine":
        return (1 - F.cosine_similarity(student, t, dim=-1)).mean()
    if distance == "mse":
        return F.mse_loss(student, t)
    if distance == "l2":
        return (student - t).norm(dim=-1).mean()
    raise ValueError(f"distance must be one of {EMBED_DISTANCES}, got {distance!r}")


def similarity_distillation_loss(
    q: torch.Tensor, p: torch.Tensor, teacher_q: torch.Tensor, teacher_p: torch.Tensor
) -> torch.Tensor:
    """Match the teacher's in-batch cosine similarity matrix: mean over this process's rows of the
    mean squared difference, (B, N) each.  Dimension-free: student (D) and teacher (Dt) widths may differ.

    ``q`` (B, D), ``p`` (N, D) (gathered under cross-device negatives); ``teacher_q``
    (B, Dt), ``teacher_p`` (N, Dt) the same texts' teacher embeddings.  Row means
    over every rank's N passages average over ranks to the global batch's value.
    """
    s = cosine_similarities(q, p)  # (B, N)
    t = cosine_similarities(teacher_q.detach(), teacher_p.detach()).to(s.dtype)
    return ((s - t) ** 2).mean()


SIMILARITY_DISTILL_KINDS = ("mse", "kl")


def listwise_similarity_distillation_loss(
    student_scores: torch.Tensor, teacher_q: torch.Tensor, teacher_p: torch.Tensor, teacher_temperature: float
) -> torch.Tensor:
    """KL(teacher || student) between each query's softmax over the in-batch passages, mean over rows.

    ``student_scores`` (B, N): the student's logits (similarity / its temperature, as the contrastive
    loss sees them); ``teacher_q`` (B, Dt), ``teacher_p`` (N, Dt): the same texts' teacher
    embeddings, whose cosines are divided by ``teacher_temperature``.  Unlike the MSE on raw
    cosines this is invariant to a shift of a row's scores, so a student at temperature 0.02 and a
    teacher whose cosines sit in [0, 0.7] can agree (RocketQAv2 / TAS-B style in-batch distillation).
    Rows average over ranks to the global batch's value, as the contrastive loss does.
    """
    t = cosine_similarities(teacher_q.detach(), teacher_p.detach())  # (B, N)
    if t.shape != student_scores.shape:
        raise ValueError(f"teacher similarities {tuple(t.shape)} vs student scores {tuple(student_scores.shape)}")
    dtype = torch.promote_types(student_scores.dtype, torch.float32)
    log_t = F.log_softmax(t.to(dtype) / teacher_temperature, dim=-1)  # (B, N)
    log_s = F.log_softmax(student_scores.to(dtype), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
