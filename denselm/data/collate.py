"""Text groups of a global batch -> this rank's tensors: format, fit, tokenize (EOS), pad, mask.

``collate_groups`` runs in DataLoader workers.  It receives the whole global
batch (every rank draws the same groups), formats and tokenizes only this
rank's slice, and builds the false-negative mask over the whole batch's
passages so rows line up with cross-device scores.

Shapes (B = queries on this rank, G = group size, P = B_global * G)::

    query["input_ids"]      (B, Tq)      passage["input_ids"]  (B * G, Tp)
    teacher_scores          (B * G,)     false_negative_mask   (B, P)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import numpy as np
import torch

from denselm.data.config import DataConfig
from denselm.data.formats import TaskSpec
from denselm.data.sampling import false_negative_mask, rank_slice
from denselm.data.templates import (
    ICLExample,
    fit_query_ids,
    format_example,
    format_passage,
    format_query,
    get_template,
    truncate_text,
)
from denselm.data.tokenize import pad_batch, special_tokens, tokenize_with_eos


@dataclass
class Group:
    """One query of a global batch, as text: the output of sampling, the input of collation."""

    query: str
    prompt: str | None
    """The line's prompt, else the global one (None for templates without an instruction)."""
    passages: list[str]
    """Raw texts: the chosen positive first, then group_size - 1 negatives."""
    scores: list[float] | None
    """Teacher scores aligned with ``passages``; None when the line has none."""
    icl_response: str
    """This pair's response when another query uses it as an in-context example."""
    examples: list[int] = field(default_factory=list)
    """Global-batch positions of the pairs used as this query's in-context examples, in order."""
    repeated_negatives: bool = False
    """Fewer negatives than the group needed: the list was repeated (the seed's rule)."""
    passage_ids: list[str] | None = None
    """Document id of each of ``passages`` (data.mask_same_document); None = not used."""
    positive_ids: list[str] | None = None
    """Document ids of every positive of the example: passages with one of them are not negatives."""


def document_id(texts: Sequence[str], ids: Sequence[str] | None, index: int) -> str:
    """The data's id of ``texts[index]``, else a hash of its text (two namespaces: they never collide)."""
    if ids is not None:
        return "id:" + ids[index]
    return "sha1:" + hashlib.sha1(texts[index].encode("utf-8")).hexdigest()


def same_document_mask(groups: Sequence[Group], rows: Sequence[int]) -> np.ndarray:
    """(len(rows), P) bool: passage j carries a document id of query i's positives, and is not its positive.

    P = B_global * G passages in group order; ``rows`` are global query indices.
    Built over the whole global batch, so it is exact under cross-device negatives.
    """
    group_size = len(groups[0].passages)
    if any(g.passage_ids is None or g.positive_ids is None for g in groups):
        raise ValueError("data.mask_same_document: every group needs passage_ids and positive_ids")
    codes: dict[str, int] = {}
    passage_codes = np.fromiter((codes.setdefault(k, len(codes)) for g in groups for k in g.passage_ids),
                                dtype=np.int64, count=len(groups) * group_size)
    mask = np.zeros((len(rows), passage_codes.size), dtype=bool)
    for r, i in enumerate(rows):
        own = [codes[k] for k in groups[i].positive_ids if k in codes]
        mask[r] = np.isin(passage_codes, own)
        mask[r, i * group_size] = False
    return mask


@dataclass
class TrainBatch:
    """One step's inputs for one rank; counts are over this rank's slice (sum over ranks = global)."""

    query: dict[str, torch.Tensor]
    """input_ids / attention_mask, (B, Tq) long, EOS last, padded on data.padding_side."""
    passage: dict[str, torch.Tensor]
    """input_ids / attention_mask, (B * G, Tp) long; query i's group is rows i*G .. i*G+G-1, positive first."""
    messages: list[str]
    """["normal"] (in-batch negatives) or ["custom"] (own group only): the seed's forward argument."""
    teacher_scores: torch.Tensor | None
    """(B * G,) float32 in passage order, or None unless every query of the global batch has scores."""
    false_negative_mask: torch.Tensor | None
    """(B, B_global * G) bool, True = same text as query i's positive (or, with data.mask_same_document, same
    document), not its own positive; None if none."""
    num_false_negatives: int
    """True entries the loss would use: the whole mask in normal mode, own groups only in custom mode."""
    dataset: str
    """The file this batch came from."""
    query_tokens: int
    """Real (unpadded) query tokens, for tokens/s."""
    passage_tokens: int
    """Real (unpadded) passage tokens."""
    num_truncated_queries: int = 0
    """Queries cut to data.query_max_len."""
    num_truncated_passages: int = 0
    """Passages cut to data.passage_max_len."""
    num_repeated_negatives: int = 0
    """Queries whose negative list had to be repeated to fill the group."""
    num_same_document: int = 0
    """True entries of the same-document mask the loss would use (data.mask_same_document; counted alone)."""
    num_icl_examples: int = 0
    """In-context examples placed in this slice's queries."""
    group_size: int = 1
    """G: passages per query."""
    query_texts: list[str] = field(default_factory=list)
    """This rank's raw queries (no instruction), for teachers that embed text (loss.embed_distill_*)."""
    passage_texts: list[str] = field(default_factory=list)
    """This rank's raw passages in passage order."""
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    step: int = 0
    """Step within the epoch (the sampler position this batch was drawn at)."""

    @property
    def batch_size(self) -> int:
        """B: queries on this rank."""
        return int(self.query["input_ids"].shape[0])

    def local_false_negative_mask(self) -> torch.Tensor | None:
        """(B, B * G): the mask's columns of this rank's passages (scores without cross-device gather)."""
        if self.false_negative_mask is None:
            return None
        width = self.batch_size * self.group_size
        return self.false_negative_mask[:, self.rank * width : (self.rank + 1) * width]

    def group_false_negative_mask(self) -> torch.Tensor | None:
        """(B, G): each query's own group only (the "custom" mode's scores)."""
        if self.false_negative_mask is None:
            return None
        b, g = self.batch_size, self.group_size
        cols = (self.rank * b + torch.arange(b))[:, None] * g + torch.arange(g)[None, :]  # (B, G)
        return torch.gather(self.false_negative_mask, 1, cols.to(self.false_negative_mask.device))

    def stats(self) -> dict[str, int]:
        """The counts, for logging (all-reduce them for global numbers)."""
        names = ("query_tokens", "passage_tokens", "num_false_negatives", "num_same_document", "num_truncated_queries",
                 "num_truncated_passages", "num_repeated_negatives", "num_icl_examples")
        return {n: int(getattr(self, n)) for n in names}

    def _map_tensors(self, fn) -> "TrainBatch":
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, dict):
                changes[f.name] = {k: fn(v) for k, v in value.items()}
        return replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        """A copy with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainBatch":
        """Called by DataLoader(pin_memory=True) so host-to-device copies can overlap compute."""
        return self._map_tensors(lambda t: t.pin_memory())


def _icl_examples(tokenizer, cfg: DataConfig, groups: Sequence[Group], local: range, prompts) -> list[list[ICLExample]]:
    """Each local query's in-context examples, truncated per example and cut to the token budget."""
    template = get_template(cfg.template)
    needed = sorted({j for i in local for j in groups[i].examples})
    cache: dict[int, tuple[ICLExample, int]] = {}
    for j in needed:
        q, _ = truncate_text(tokenizer, groups[j].query, cfg.example_query_max_len)
        r, _ = truncate_text(tokenizer, groups[j].icl_response, cfg.example_passage_max_len)
        ex = ICLExample(prompts[j], q, r)
        n_tokens = len(tokenizer(format_example(template, ex), add_special_tokens=False)["input_ids"])
        cache[j] = (ex, n_tokens)
    budget = cfg.resolved_icl_token_budget
    out = []
    for i in local:
        chosen, used = [], 0
        for j in groups[i].examples:
            ex, n_tokens = cache[j]
            if used + n_tokens > budget:  # the seed stops at the first example that does not fit
                break
            chosen.append(ex)
            used += n_tokens
        out.append(chosen)
    return out


def passage_keys(cfg: DataConfig, spec: TaskSpec, groups: Sequence[Group], prompts) -> list[str]:
    """The formatted (untruncated) text of every passage of the global batch: equal keys, equal inputs."""
    if spec.passages_like_queries:
        return [format_query(cfg.template, prompts[i], p) for i, g in enumerate(groups) for p in g.passages]
    return [format_passage(cfg.template, p, cfg.passage_prefix) for g in groups for p in g.passages]


def collate_groups(
    groups: Sequence[Group],
    tokenizer,
    cfg: DataConfig,
    spec: TaskSpec,
    mode: str,
    dataset: str,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    step: int = 0,
) -> TrainBatch:
    """Turn the global batch's groups into this rank's ``TrainBatch``."""
    group_size = len(groups[0].passages)
    if any(len(g.passages) != group_size for g in groups):
        raise ValueError("every group of a batch must have the same number of passages")
    sl = rank_slice(len(groups), world_size, rank)
    local = range(sl.start, sl.stop)
    prompts = [g.prompt if g.prompt is not None else cfg.prompt for g in groups]

    # queries: [examples] + instruction + query (cut at token level) + suffix, then BOS/EOS
    examples = _icl_examples(tokenizer, cfg, groups, local, prompts) if cfg.icl_max_examples > 0 else None
    q_ids, q_cut = fit_query_ids(
        tokenizer, cfg.template, [prompts[i] for i in local], [groups[i].query for i in local],
        cfg.query_max_len, examples, cut=cfg.query_cut,
    )
    pad_id = special_tokens(tokenizer).pad_id
    query = pad_batch(q_ids, pad_id, cfg.padding_side, cfg.pad_to_multiple_of)

    # passages: the text (with prefix), or formatted like queries for symmetric tasks
    local_passages = [p for i in local for p in groups[i].passages]
    if spec.passages_like_queries:
        p_prompts = [prompts[i] for i in local for _ in groups[i].passages]
        p_ids, p_cut = fit_query_ids(tokenizer, cfg.template, p_prompts, local_passages, cfg.passage_max_len,
                                     cut=cfg.query_cut)
    else:
        p_texts = [format_passage(cfg.template, p, cfg.passage_prefix) for p in local_passages]
        p_ids, p_cut = tokenize_with_eos(tokenizer, p_texts, cfg.passage_max_len, return_truncated=True)
    passage = pad_batch(p_ids, pad_id, cfg.padding_side, cfg.pad_to_multiple_of)

    # teacher scores only when the whole global batch has them, so every rank agrees on the loss
    teacher = None
    if all(g.scores is not None for g in groups):
        teacher = torch.tensor([s for i in local for s in groups[i].scores], dtype=torch.float32)

    def used(m: torch.Tensor) -> int:
        """True entries the loss sees: all in normal mode, own groups in custom mode."""
        if mode == "custom":
            cols = (torch.arange(sl.start, sl.stop)[:, None] * group_size + torch.arange(group_size)[None, :])
            return int(torch.gather(m, 1, cols).sum())
        return int(m.sum())

    mask, n_false, n_same_doc = None, 0, 0
    if cfg.mask_false_negatives:
        full = false_negative_mask(passage_keys(cfg, spec, groups, prompts), group_size, list(local))  # (B, P)
        if full.any():
            mask = torch.from_numpy(full)
            n_false = used(mask)
    if cfg.mask_same_document:
        same = torch.from_numpy(same_document_mask(groups, list(local)))  # (B, P), OR-ed with the duplicates
        n_same_doc = used(same)
        if same.any():
            mask = same if mask is None else mask | same

    return TrainBatch(
        query=query,
        passage=passage,
        messages=[mode],
        teacher_scores=teacher,
        false_negative_mask=mask,
        num_false_negatives=n_false,
        num_same_document=n_same_doc,
        query_texts=[groups[i].query for i in local],
        passage_texts=local_passages,
        dataset=dataset,
        query_tokens=int(query["attention_mask"].sum()),
        passage_tokens=int(passage["attention_mask"].sum()),
        num_truncated_queries=q_cut,
        num_truncated_passages=p_cut,
        num_repeated_negatives=sum(groups[i].repeated_negatives for i in local),
        num_icl_examples=sum(len(e) for e in examples) if examples else 0,
        group_size=group_size,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        step=step,
    )
