"""Retrieval metrics (nDCG@k, MRR@k, Recall@k, MAP) and model evaluation on BEIR-format data.

    denselm evaluate --model out/ --data data/scifact --split test --k 1 10 100 --output metrics.json

Metric definitions follow trec_eval (cross-checked against pytrec_eval in tests/test_evaluate.py):
- relevance: a document is relevant when its qrels grade is > 0; unjudged documents are not.
- ``ndcg@k``: DCG = sum over ranks r <= k of gain / log2(r + 1) with gain = the grade (linear,
  trec_eval's ``ndcg_cut``; negative grades count 0), divided by the DCG of the ideal ordering of
  all judged relevant documents.
- ``mrr@k``: 1 / rank of the first relevant document if it is within the top k, else 0.
- ``recall@k``: relevant documents in the top k / all relevant documents.
- ``map``: average precision over the whole ranking given (trec_eval ``map``); for a run cut at
  depth K this is MAP over the top K, as in BEIR.
- ties: the run is ranked by score descending, then document id descending (string order), which
  is trec_eval's rule: it ignores the rank column and its sort comparator falls back to
  ``strcmp(docno2, docno1)``. (ir_measures' msmarco provider breaks ties differently.)
- averaging: the mean over every query in the qrels; a query missing from the run scores 0 on
  every metric (trec_eval ``-c``; ir_measures' default), and so does a query whose judgements are
  all 0. Queries in the run but not in the qrels are ignored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from denselm.beir import BeirData
from denselm.errors import DataError, InputNotFound, UserError
from denselm.io import atomic_write, write_trec_run
from denselm.outputs import prepare_output
from denselm.search import exact_search, topk_to_run

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]  # query id -> doc id -> score
Qrels = dict[str, dict[str, int]]  # query id -> doc id -> grade
EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> embeddings [n, d]


def rank_documents(doc_scores: dict[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score descending, then doc id descending."""
    return sorted(doc_scores, key=lambda did: (doc_scores[did], did), reverse=True)


def metric_names(ks: Iterable[int]) -> list[str]:
    ks = list(ks)
    return [f"ndcg@{k}" for k in ks] + [f"mrr@{k}" for k in ks] + [f"recall@{k}" for k in ks] + ["map"]


def query_metrics(ranking: Sequence[str], judgements: dict[str, int], ks: Iterable[int]) -> dict[str, float]:
    """Metrics of one query from its ranked doc ids and its qrels (doc id -> grade)."""
    ks = list(ks)
    gains = np.array([max(judgements.get(did, 0), 0) for did in ranking], dtype=np.float64)  # [n] per rank
    relevant = gains > 0  # [n]
    ideal = np.sort(np.array([g for g in judgements.values() if g > 0], dtype=np.float64))[::-1]  # [R]
    num_relevant = ideal.size
    out = dict.fromkeys(metric_names(ks), 0.0)
    if num_relevant == 0 or not relevant.any():
        return out  # nothing relevant (judged or retrieved): every metric is 0, as in trec_eval

    ranks = np.arange(1, max(len(ranking), num_relevant) + 1)
    discounts = 1.0 / np.log2(ranks + 1)  # [max(n, R)], discount of rank r is 1 / log2(r + 1)
    first_rank = int(np.argmax(relevant)) + 1
    for k in ks:
        dcg = float(gains[:k] @ discounts[: min(k, gains.size)])
        idcg = float(ideal[:k] @ discounts[: min(k, num_relevant)])
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"mrr@{k}"] = 1.0 / first_rank if first_rank <= k else 0.0
        out[f"recall@{k}"] = float(relevant[:k].sum()) / num_relevant
    # AP: precision at each relevant rank, summed, over all relevant (unretrieved ones add 0).
    hit_ranks = np.flatnonzero(relevant) + 1  # [h] ranks of relevant hits
    out["map"] = float((np.arange(1, hit_ranks.size + 1) / hit_ranks).sum()) / num_relevant
    return out


def per_query_metrics(run: Run, qrels: Qrels, ks: Iterable[int] = (1, 10, 100)) -> dict[str, dict[str, float]]:
    """Query id -> metrics, for every query in ``qrels`` (missing from the run -> zeros)."""
    ks = list(ks)
    return {qid: query_metrics(rank_documents(run.get(qid, {})), judged, ks) for qid, judged in qrels.items()}


def evaluate_run(run: Run, qrels: Qrels, ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean metrics over the queries of ``qrels`` (see the module docstring for the rules)."""
    ks = list(ks)
    if not qrels:
        raise DataError("qrels are empty: nothing to evaluate")
    per_query = per_query_metrics(run, qrels, ks)
    return {name: float(np.mean([m[name] for m in per_query.values()])) for name in metric_names(ks)}


def format_table(results: dict[str, dict[str, float]], digits: int = 4) -> str:
    """Systems side by side: one row per metric, one column per system.

    >>> print(format_table({"bm25": {"ndcg@10": 0.5}, "ours": {"ndcg@10": 0.61234}}))
    metric   bm25    ours
    ndcg@10  0.5000  0.6123
    """
    names = list(results)
    metrics: list[str] = []
    for values in results.values():
        metrics += [m for m in values if m not in metrics]
    rows = [["metric", *names]]
    for metric in metrics:
        rows.append([metric] + [f"{results[n][metric]:.{digits}f}" if metric in results[n] else "-" for n in names])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def evaluate_embeddings(
    query_ids: Sequence[str],
    query_emb: np.ndarray,
    doc_ids: Sequence[str],
    doc_emb: np.ndarray,
    qrels: Qrels,
    ks: Iterable[int] = (1, 10, 100),
    ignore_identical_ids: bool = False,
    *,
    depth: int | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Exact search of the judged queries over the corpus, then ``evaluate_run``.

    ``depth``: hits retrieved per query (default max(ks)); MAP is computed over them.
    Shape: query_emb [Q, d], doc_emb [N, d].
    """
    run = search_run(query_ids, query_emb, doc_ids, doc_emb, max(ks) if depth is None else depth,
                     ignore_identical_ids, device=device, only=qrels)
    return evaluate_run(run, qrels, ks)


def search_run(
    query_ids: Sequence[str],
    query_emb: np.ndarray,
    doc_ids: Sequence[str],
    doc_emb: np.ndarray,
    depth: int,
    ignore_identical_ids: bool = False,
    *,
    device: str | None = None,
    only: Iterable[str] | None = None,
) -> Run:
    """Exact-search run of depth ``depth`` (restricted to query ids in ``only`` when given)."""
    if len(query_ids) != len(query_emb) or len(doc_ids) != len(doc_emb):
        raise ValueError(
            f"ids and embeddings disagree: {len(query_ids)} query ids for {len(query_emb)} rows, "
            f"{len(doc_ids)} doc ids for {len(doc_emb)} rows"
        )
    if only is not None:
        keep = set(only)
        rows = [i for i, qid in enumerate(query_ids) if qid in keep]
        query_ids, query_emb = [query_ids[i] for i in rows], np.asarray(query_emb)[rows]
    # One spare hit per query when the query's own id may be dropped, so depth hits remain.
    k = depth + 1 if ignore_identical_ids else depth
    scores, indices = exact_search(query_emb, doc_emb, k, device=device)
    return topk_to_run(query_ids, doc_ids, scores, indices, ignore_identical_ids, k=depth)


def retrieve(
    encode_queries_fn: EncodeFn,
    encode_corpus_fn: EncodeFn,
    data: BeirData,
    depth: int = 100,
    ignore_identical_ids: bool = False,
    device: str | None = None,
) -> Run:
    """Encode ``data``'s queries and corpus with the two callables and exact-search them."""
    t0 = time.perf_counter()
    doc_emb = np.asarray(encode_corpus_fn(list(data.corpus_texts)), dtype=np.float32)  # [N, d]
    query_emb = np.asarray(encode_queries_fn(list(data.query_texts)), dtype=np.float32)  # [Q, d]
    if doc_emb.shape[0] != len(data.corpus_ids) or query_emb.shape[0] != len(data.query_ids):
        raise ValueError(
            f"encoders returned {doc_emb.shape[0]} corpus / {query_emb.shape[0]} query embeddings for "
            f"{len(data.corpus_ids)} documents / {len(data.query_ids)} queries"
        )
    t1 = time.perf_counter()
    run = search_run(data.query_ids, query_emb, data.corpus_ids, doc_emb, depth, ignore_identical_ids, device=device)
    logger.info("encoded %d docs + %d queries in %.1fs, searched in %.1fs",
                len(data.corpus_ids), len(data.query_ids), t1 - t0, time.perf_counter() - t1)
    return run


def evaluate_model(
    encode_queries_fn: EncodeFn,
    encode_corpus_fn: EncodeFn,
    data: BeirData,
    ks: Iterable[int] = (1, 10, 100),
    ignore_identical_ids: bool = False,
    *,
    depth: int | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Metrics of any encoder on a BEIR split; the two callables map list[str] -> [n, d] arrays.

    The training loop calls this for periodic evaluation, e.g.
    ``evaluate_model(lambda t: enc.encode_queries(t), enc.encode_corpus, data, ks=(10,))``.
    """
    ks = list(ks)
    run = retrieve(encode_queries_fn, encode_corpus_fn, data, max(ks) if depth is None else depth,
                   ignore_identical_ids, device)
    return evaluate_run(run, data.qrels, ks)


def write_json(path: str | Path, payload: dict) -> None:
    """Write JSON atomically (temp file + os.replace): a crash never leaves a partial file."""
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="trained output folder or a known embedder folder")
    parser.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", default="test", help="qrels split (default test)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 100],
                        help="metric cut-offs (default 1 10 100); MAP uses the top max(k) hits")
    parser.add_argument("--depth", type=int, default=None, help="hits retrieved per query (default max(--k))")
    parser.add_argument("--query-instruction", default=None,
                        help="instruction for queries (default: the one in the model's manifest)")
    parser.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default: the encoder's)")
    parser.add_argument("--ignore-identical-ids", action="store_true",
                        help="drop hits whose document id equals the query id (BEIR's ArguAna/Quora rule)")
    parser.add_argument("--device", default=None, help="device for encoding and search (default: cuda if available)")
    parser.add_argument("--preset", default=None,
                        help="template preset for a plain transformers embedder without a denselm manifest "
                             "(bge-en-icl, e5-mistral, qwen3-embedding, plain)")
    parser.add_argument("--output", default=None, help="metrics JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output and --run-output if they exist")
    parser.add_argument("--per-query", action="store_true", help="also write per-query metrics into --output")
    parser.add_argument("--run-output", default=None, help="also write the retrieved run as a TREC file")


def run(args) -> int:
    from denselm.beir import load_beir

    if any(k < 1 for k in args.k):
        raise UserError(f"--k values must be >= 1, got {args.k}")
    depth = max(args.k) if args.depth is None else args.depth
    if depth < max(args.k):
        raise UserError(f"--depth {depth} is smaller than the largest --k {max(args.k)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    data = load_beir(args.data, args.split)  # validate data before loading a model
    if not Path(args.model).exists():
        raise InputNotFound(f"--model {args.model}: no model folder")
    for flag, out in (("--output", args.output), ("--run-output", args.run_output)):
        prepare_output(out, args.overwrite, flag)  # refused if it exists, writable: before the model loads

    from denselm.inference import load_encoder  # imported lazily: it pulls in transformers

    encoder = load_encoder(args.model, device=args.device, preset=args.preset)
    batch = {} if args.batch_size is None else {"batch_size": args.batch_size}
    run_ = retrieve(
        lambda texts: encoder.encode_queries(texts, instruction=args.query_instruction, **batch),
        lambda texts: encoder.encode_corpus(texts, **batch),
        data, depth, args.ignore_identical_ids, args.device,
    )
    metrics = evaluate_run(run_, data.qrels, args.k)
    print(format_table({Path(args.model).name or str(args.model): metrics}))
    if args.run_output:
        write_trec_run(args.run_output, run_)
    if args.output:
        payload = {
            "model": str(args.model),
            "data": str(args.data),
            "split": args.split,
            "ks": list(args.k),
            "depth": depth,
            "query_instruction": args.query_instruction,
            "ignore_identical_ids": args.ignore_identical_ids,
            "num_queries": len(data.query_ids),
            "num_docs": len(data.corpus_ids),
            "data_stats": asdict(data.stats),
            "metrics": metrics,
        }
        if args.per_query:
            payload["per_query"] = per_query_metrics(run_, data.qrels, args.k)
        write_json(args.output, payload)
        logger.info("wrote %s", args.output)
    return 0
