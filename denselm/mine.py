"""`denselm mine`: hard negatives from a model's (or BM25's) ranking, with false-negative control.

    denselm mine --model out/model --input train.jsonl --output mined.jsonl --range 10-100 --num-negatives 15
    denselm mine --model bm25 --input train.jsonl --output mined.jsonl --corpus corpus.jsonl --max-positive-ratio 0.95
    denselm mine --model out/model --input train.jsonl --output mined.jsonl --max-positive-ratio --positive-margin 0.05 \
        --judge path/to/cross-encoder --judge-kind cross-encoder

For each training line (FlagEmbedding JSONL, see ``denselm.data.formats``):

1. rank the pool, best first: by the model (query formatted with the line's ``prompt``, else
   ``--instruction``, else the manifest's; exact inner-product search, ``denselm.search``) or by
   BM25 (``bm25s``, the settings of ``denselm.baselines.bm25_run``: Lucene, k1 1.5, b 0.75).
   The pool is ``--corpus`` (BEIR ``corpus.jsonl``, title + text) or, by default, every distinct
   ``pos``/``neg`` text of the input. BM25 never ranks a document that scores 0.
2. keep the ranking slice ``[A, B)`` of ``--range A-B`` (0-based, FlagEmbedding's
   ``range_for_sampling``: ``10-100`` skips the top 10 and keeps the next 90), then drop the
   line's positives and the query itself (by exact text).
3. positive-aware filtering (NV-Retriever's "TopK-PercPos", off by default): drop candidates
   the judge scores above ``r`` times the line's lowest positive score (``--max-positive-ratio
   r``; the flag alone means 0.95) and/or above that positive score minus ``m``
   (``--positive-margin m``): they are likely unlabelled positives. The judge is the mining
   model (its ranking scores) or ``--judge TEACHER``, a bi-encoder or cross-encoder scored as in
   ``denselm score`` (then the margin is on the teacher's scale). The ratio needs a positive
   score > 0 and both rules need one at all: with BM25 and ``--corpus``, a positive absent from
   the corpus has none; such lines skip the rules that cannot apply (counted).
4. sample ``--num-negatives`` of the rest without replacement (kept in rank order),
   deterministically from ``(--seed, line number)``. Fewer left: all of them (training repeats
   negatives as needed). None left: the line keeps its original negatives.

The output keeps every field of a line (``prompt``, ``type``, ...) and replaces ``neg``; teacher
scores no longer match the new negatives, so ``pos_scores``/``neg_scores`` are removed (rerun
``denselm score``). Counts (each rule's drops, quantiles of the judge's scores of the kept
negatives and of the positives) are logged and written to ``OUTPUT.stats.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from denselm.data.formats import read_training_lines, write_jsonl
from denselm.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class MineStats:
    """What mining did, line by line; written beside the output."""

    lines: int = 0
    mined: int = 0
    """Lines whose negatives were replaced."""
    too_few_candidates: int = 0
    """Lines with fewer candidates than --num-negatives (all of them were kept)."""
    no_candidates: int = 0
    """Lines with no candidate left: their original negatives were kept."""
    positives_in_range: int = 0
    """Candidates dropped because their text is one of the line's positives (or its query)."""
    false_negatives_dropped: int = 0
    """Candidates dropped by the positive-aware rules (either or both)."""
    dropped_by_ratio: int = 0
    """Candidates above --max-positive-ratio x the positive's score (some may also be above the margin)."""
    dropped_by_margin: int = 0
    """Candidates above the positive's score minus --positive-margin (some may also be above the ratio)."""
    lines_with_false_negatives: int = 0
    lines_without_positive_score: int = 0
    """Lines where a requested rule could not apply: no positive score (BM25 pool), or a score <= 0 for the ratio."""
    teacher_scores_removed: int = 0
    """Lines whose pos_scores/neg_scores were dropped (they described the old negatives)."""
    mean_candidates: float = 0.0
    """Mean candidates per line after every filter, before sampling."""
    judge: str = "model"
    """Whose scores the rules and quantiles use: the mining model, or the --judge teacher."""
    kept_score_quantiles: dict = field(default_factory=dict)
    """The judge's scores of the negatives written (after sampling): count, min, p05 ... p95, max."""
    positive_score_quantiles: dict = field(default_factory=dict)
    """The judge's score of each mined line's lowest positive, same quantiles."""


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """``{"count", "min", "p05", "p25", "p50", "p75", "p95", "max"}`` of the finite values (count 0: only count)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"count": 0}
    out = {"count": int(len(v)), "min": float(v.min())}
    out.update({f"p{round(q * 100):02d}": float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))})
    out["max"] = float(v.max())
    return out


# ------------------------------------------------------------------------------------ pieces


def parse_range(text: str) -> tuple[int, int]:
    """``"10-100"`` -> (10, 100): the 0-based ranking slice [10, 100)."""
    try:
        lo, hi = (int(x) for x in str(text).split("-"))
    except ValueError:
        raise UserError(f"--range must look like 10-100 (two integers), got {text!r}") from None
    if not 0 <= lo < hi:
        raise UserError(f"--range {text}: need 0 <= start < end")
    return lo, hi


def pool_from_lines(lines: Sequence[tuple[int, dict]]) -> list[str]:
    """Every distinct pos/neg text, in order of first appearance."""
    seen: dict[str, None] = {}
    for _, obj in lines:
        for text in [*obj["pos"], *(obj.get("neg") or [])]:
            seen.setdefault(text, None)
    return list(seen)


def candidates_in_range(
    ranked: Sequence[int], scores: Sequence[float], pool: Sequence[str], exclude: set[str], lo: int, hi: int,
) -> tuple[list[str], list[float], int]:
    """The ranking slice [lo, hi) minus texts in ``exclude``: (texts, their scores, how many were excluded)."""
    texts, kept, excluded = [], [], 0
    for idx, score in zip(list(ranked)[lo:hi], list(scores)[lo:hi]):
        if pool[idx] in exclude:
            excluded += 1
        else:
            texts.append(pool[idx])
            kept.append(float(score))
    return texts, kept, excluded


def positive_aware_masks(
    scores: Sequence[float], positive: float, ratio: float | None = None, margin: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """NV-Retriever's TopK-PercPos rules on one line: (above_ratio, above_margin), boolean (C,).

    ``above_ratio[j]``: ``scores[j] > ratio * positive``; ``above_margin[j]``: ``scores[j] > positive - margin``.
    A rule that is off (None) or cannot apply (positive NaN; for the ratio, positive <= 0, where
    "95% of the positive" would rank above it) masks nothing.
    """
    s = np.asarray(scores, dtype=np.float64)
    by_ratio = np.zeros(len(s), dtype=bool)
    by_margin = np.zeros(len(s), dtype=bool)
    if ratio is not None and np.isfinite(positive) and positive > 0:
        by_ratio = s > ratio * positive
    if margin is not None and np.isfinite(positive):
        by_margin = s > positive - margin
    return by_ratio, by_margin


def sample_in_order(n: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``num`` of ``n`` items without replacement, ascending (rank order); all when n <= num."""
    if n <= num:
        return np.arange(n)
    return np.sort(rng.choice(n, size=num, replace=False))


def select_negatives(
    ranked: Sequence[int],
    scores: Sequence[float],
    pool: Sequence[str],
    exclude: set[str],
    lo: int,
    hi: int,
    num: int,
    rng: np.random.Generator,
    threshold: float | None = None,
) -> tuple[list[str], dict[str, int]]:
    """Negatives for one line from its ranking (pool indices, best first, with their scores).

    Slice [lo, hi), drop texts in ``exclude`` (positives, the query), drop scores above
    ``threshold``, sample ``num`` without replacement keeping rank order. Returns (texts, counts).
    """
    texts, kept, excluded = candidates_in_range(ranked, scores, pool, exclude, lo, hi)
    above = np.asarray(kept, dtype=np.float64) > threshold if threshold is not None else np.zeros(len(texts), bool)
    candidates = [t for t, a in zip(texts, above) if not a]
    counts = {"excluded": excluded, "false_negatives": int(above.sum()), "candidates": len(candidates)}
    return [candidates[i] for i in sample_in_order(len(candidates), num, rng)], counts


def _line_rng(seed: int, line_no: int) -> np.random.Generator:
    return np.random.default_rng([seed, line_no])


# ------------------------------------------------------------------------------------ rankers


def dense_rankings(encoder, queries, prompts, pool, positives, depth, instruction=None, device=None):
    """Model ranking: (indices [Q, k], scores [Q, k], lowest positive score per line [Q]).

    Queries are grouped by prompt (one ``encode_queries`` call per distinct instruction).
    """
    from denselm.search import exact_search

    pool_emb = encoder.encode_corpus(list(pool))  # (N, D)
    q_emb = np.empty((len(queries), pool_emb.shape[1]), dtype=np.float32)
    by_prompt: dict[str | None, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p if p is not None else instruction, []).append(i)
    for prompt, rows in by_prompt.items():
        q_emb[rows] = encoder.encode_queries([queries[i] for i in rows], instruction=prompt)
    scores, indices = exact_search(q_emb, pool_emb, depth, device=device)  # (Q, k) each

    # positives' scores: reuse pool rows, encode the ones missing from the pool
    where = {t: i for i, t in enumerate(pool)}
    extra = sorted({t for ps in positives for t in ps if t not in where})
    extra_emb = encoder.encode_corpus(extra) if extra else np.zeros((0, pool_emb.shape[1]), np.float32)
    extra_at = {t: i for i, t in enumerate(extra)}
    pos_min = np.empty(len(queries), dtype=np.float64)
    for i, ps in enumerate(positives):
        vecs = np.stack([pool_emb[where[t]] if t in where else extra_emb[extra_at[t]] for t in ps])  # (P, D)
        pos_min[i] = float((vecs.astype(np.float32) @ q_emb[i]).min())
    return indices, scores, pos_min


def bm25_rankings(queries, pool, positives, depth, k1: float = 1.5, b: float = 0.75):
    """BM25 ranking (documents scoring 0 left out; index -1 pads): indices, scores, lowest positive score.

    A positive absent from the pool has no score (NaN).
    """
    from denselm.errors import require

    bm25s = require("bm25s", "mine", "--model bm25")

    from denselm.baselines import bm25_tokenize

    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(bm25_tokenize(pool), show_progress=False)
    where = {t: i for i, t in enumerate(pool)}
    k = min(depth, len(pool))
    indices = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    pos_min = np.full(len(queries), np.nan)
    for i, tokens in enumerate(bm25_tokenize(queries)):
        full = np.asarray(retriever.get_scores_from_ids(retriever.get_tokens_ids(tokens)), dtype=np.float32)  # (N,)
        top = np.argpartition(-full, k - 1)[:k] if k < len(full) else np.arange(len(full))
        top = top[np.lexsort((top, -full[top]))]  # score descending, then lower index
        top = top[full[top] > 0]
        indices[i, : len(top)], scores[i, : len(top)] = top, full[top]
        known = [where[t] for t in positives[i] if t in where]
        if len(known) == len(positives[i]):
            pos_min[i] = float(full[known].min())
    return indices, scores, pos_min


# ------------------------------------------------------------------------------------ mining


Judge = Callable[[Sequence[str], Sequence[Sequence[str]]], list[list[float]]]
"""(queries, texts per line) -> scores per line: ``denselm.score``'s teachers have this shape."""


def mine_lines(
    lines: Sequence[tuple[int, dict]],
    pool: Sequence[str],
    indices: np.ndarray,
    scores: np.ndarray,
    pos_min: np.ndarray,
    lo: int,
    hi: int,
    num_negatives: int,
    seed: int = 42,
    max_positive_ratio: float | None = None,
    positive_margin: float | None = None,
    judge: Judge | None = None,
) -> tuple[list[dict], MineStats]:
    """New training objects from each line's ranking; pure given the rankings (and the judge).

    ``indices``/``scores``: (Q, k) ranking, -1 pads; ``pos_min``: (Q,) the ranker's lowest positive
    score. With ``judge``, the positive-aware rules and the quantiles use its scores of each line's
    positives (lowest) and candidates instead.
    """
    stats = MineStats(lines=len(lines), judge="teacher" if judge is not None else "model")
    cands = []  # per line: (texts, ranker scores), after the slice and the exclusion
    for row, (_, obj) in enumerate(lines):
        valid = indices[row] >= 0
        texts, kept, excluded = candidates_in_range(
            indices[row][valid], scores[row][valid], pool, set(obj["pos"]) | {obj["query"]}, lo, hi)
        stats.positives_in_range += excluded
        cands.append((texts, kept))
    if judge is not None:
        # one call for every line: teachers score each distinct text / pair once
        judged = judge([obj["query"] for _, obj in lines], [[*obj["pos"], *t] for (_, obj), (t, _) in zip(lines, cands)])
        n_pos = [len(obj["pos"]) for _, obj in lines]
        positive = np.array([min(j[:n]) for j, n in zip(judged, n_pos)], dtype=np.float64)
        cand_scores = [j[n:] for j, n in zip(judged, n_pos)]
    else:
        positive = np.asarray(pos_min, dtype=np.float64)
        cand_scores = [k for _, k in cands]

    out, total_candidates, kept_scores, pos_scores = [], 0, [], []
    for row, (line_no, obj) in enumerate(lines):
        texts, s = cands[row][0], cand_scores[row]
        p = positive[row]
        if (max_positive_ratio is not None and not (np.isfinite(p) and p > 0)) or (
                positive_margin is not None and not np.isfinite(p)):
            stats.lines_without_positive_score += 1
        by_ratio, by_margin = positive_aware_masks(s, p, max_positive_ratio, positive_margin)
        drop = by_ratio | by_margin  # (C,)
        stats.dropped_by_ratio += int(by_ratio.sum())
        stats.dropped_by_margin += int(by_margin.sum())
        stats.false_negatives_dropped += int(drop.sum())
        stats.lines_with_false_negatives += bool(drop.any())
        keep = np.flatnonzero(~drop)
        total_candidates += len(keep)
        chosen = keep[sample_in_order(len(keep), num_negatives, _line_rng(seed, line_no))]
        new = dict(obj)
        if not len(chosen):
            stats.no_candidates += 1
        else:
            stats.mined += 1
            stats.too_few_candidates += len(chosen) < num_negatives
            new["neg"] = [texts[i] for i in chosen]
            kept_scores.extend(s[i] for i in chosen)
            pos_scores.append(p)
            if "pos_scores" in new or "neg_scores" in new:
                new.pop("pos_scores", None)
                new.pop("neg_scores", None)
                stats.teacher_scores_removed += 1
        out.append(new)
    stats.mean_candidates = total_candidates / max(len(lines), 1)
    stats.kept_score_quantiles = quantiles(kept_scores)
    stats.positive_score_quantiles = quantiles(pos_scores)
    return out, stats


# ------------------------------------------------------------------------------------ CLI


def load_judge(spec: str, kind: str, batch_size: int = 32, device: str | None = None) -> Judge:
    """A teacher from ``denselm.score`` as a judge: bi-encoder similarity or cross-encoder logit."""
    from denselm.score import bi_encoder_scores, cross_encoder_scores, load_teacher

    teacher = load_teacher(spec, kind, device)
    if kind == "bi-encoder":
        return lambda queries, texts: bi_encoder_scores(teacher, queries, texts, batch_size)
    return lambda queries, texts: cross_encoder_scores(teacher, queries, texts, batch_size)


def _fmt_quantiles(q: dict) -> str:
    if not q.get("count"):
        return "none"
    return f"n={q['count']} " + " ".join(f"{k}={v:.4g}" for k, v in q.items() if k != "count")


def add_arguments(parser) -> None:
    from denselm.encode import add_encoder_arguments

    parser.add_argument("--model", required=True, help="denselm model folder (or plain folder + --preset), or 'bm25'")
    parser.add_argument("--input", required=True, help="training JSONL (query, pos, neg, ...)")
    parser.add_argument("--output", required=True, help="training JSONL to write (neg replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output (and its .stats.json) if it exists")
    parser.add_argument("--corpus", default=None,
                        help="BEIR corpus.jsonl to draw negatives from (default: every pos/neg text of --input)")
    parser.add_argument("--range", default="10-100",
                        help="ranking slice A-B to sample from, 0-based [A, B) (default 10-100)")
    parser.add_argument("--num-negatives", type=int, default=15, help="negatives per line (default 15)")
    parser.add_argument("--max-positive-ratio", type=float, default=None, nargs="?", const=0.95,
                        help="drop candidates the judge scores above this fraction of the positive's score "
                             "(NV-Retriever's TopK-PercPos; the flag alone: 0.95)")
    parser.add_argument("--positive-margin", type=float, default=None,
                        help="drop candidates the judge scores above the positive's score minus this margin")
    parser.add_argument("--judge", default=None,
                        help="score the rules with this teacher instead of the mining model: a sentence-transformers "
                             "folder (or 'minilm'), or a cross-encoder with --judge-kind cross-encoder")
    parser.add_argument("--judge-kind", default="bi-encoder", choices=("bi-encoder", "cross-encoder"),
                        help="--judge type (default bi-encoder)")
    parser.add_argument("--judge-batch-size", type=int, default=32, help="--judge batch size (default 32)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    parser.add_argument("--instruction", default=None,
                        help="query instruction for lines without 'prompt' (default: the model's manifest)")
    add_encoder_arguments(parser)


def run(args) -> int:
    from denselm.beir import read_corpus
    from denselm.errors import ConfigError
    from denselm.io import atomic_write, remove_stale_temps
    from denselm.outputs import prepare_output

    lo, hi = parse_range(args.range)
    if args.num_negatives < 1:
        raise UserError(f"--num-negatives must be >= 1, got {args.num_negatives}")
    if args.max_positive_ratio is not None and not args.max_positive_ratio > 0:
        raise UserError(f"--max-positive-ratio must be > 0, got {args.max_positive_ratio}")
    if args.positive_margin is not None and not np.isfinite(args.positive_margin):
        raise ConfigError(f"--positive-margin must be a finite number, got {args.positive_margin}")
    if args.judge_batch_size < 1:
        raise ConfigError(f"--judge-batch-size must be >= 1, got {args.judge_batch_size}")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise UserError("--output must differ from --input")
    prepare_output(args.output, args.overwrite)  # refused if it exists, writable: before any model loads
    remove_stale_temps(Path(args.output).parent, target=Path(str(args.output) + ".stats.json").name)
    judge = load_judge(args.judge, args.judge_kind, args.judge_batch_size, args.device) if args.judge else None
    lines = read_training_lines(args.input)
    pool = list(dict.fromkeys(read_corpus(args.corpus)[1])) if args.corpus else pool_from_lines(lines)
    queries = [obj["query"] for _, obj in lines]
    positives = [list(obj["pos"]) for _, obj in lines]
    logger.info("mining %d lines over a pool of %d texts with %s, range [%d, %d)", len(lines), len(pool), args.model, lo, hi)

    if args.model == "bm25":
        indices, scores, pos_min = bm25_rankings(queries, pool, positives, hi)
    else:
        from denselm.encode import load_encoder_from_args

        encoder = load_encoder_from_args(args)
        encoder.show_progress = True
        prompts = [obj.get("prompt") for _, obj in lines]
        indices, scores, pos_min = dense_rankings(encoder, queries, prompts, pool, positives, hi,
                                                  args.instruction, args.device)
    out, stats = mine_lines(lines, pool, indices, scores, pos_min, lo, hi, args.num_negatives,
                            args.seed, args.max_positive_ratio, args.positive_margin, judge)
    write_jsonl(args.output, out)
    stats_path = Path(str(args.output) + ".stats.json")
    atomic_write(stats_path, json.dumps({"model": str(args.model), "range": [lo, hi],
                                              "num_negatives": args.num_negatives,
                                              "max_positive_ratio": args.max_positive_ratio,
                                              "positive_margin": args.positive_margin,
                                              "judge_model": args.judge, "judge_kind": args.judge_kind if args.judge else None,
                                              "seed": args.seed, **asdict(stats)}, indent=2) + "\n")
    logger.info(
        "wrote %s: %d of %d lines mined; %d with fewer than %d candidates; %d with none (kept their negatives); "
        "%d positives found in range; %d likely false negatives dropped in %d lines (%d by the ratio, %d by the "
        "margin; judge: %s); %d lines without a positive score for the rules; %d lines lost their teacher scores",
        args.output, stats.mined, stats.lines, stats.too_few_candidates, args.num_negatives, stats.no_candidates,
        stats.positives_in_range, stats.false_negatives_dropped, stats.lines_with_false_negatives,
        stats.dropped_by_ratio, stats.dropped_by_margin, args.judge or args.model,
        stats.lines_without_positive_score, stats.teacher_scores_removed,
    )
    logger.info("judge scores of the kept negatives: %s; of the positives: %s",
                _fmt_quantiles(stats.kept_score_quantiles), _fmt_quantiles(stats.positive_score_quantiles))
    if stats.no_candidates:
        logger.warning("%d lines got no candidate in --range %s; widen the range or the pool", stats.no_candidates, args.range)
    return 0
