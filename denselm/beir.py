"""Read BEIR-format retrieval data: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``.

    from denselm.beir import load_beir
    data = load_beir("data/scifact", split="test")
    data.corpus_texts[0]   # "title text" (see format_document)

Layout (as written by the BEIR project):
- ``corpus.jsonl``: one JSON object per line with ``_id``, ``title`` (may be empty or absent), ``text``.
- ``queries.jsonl``: one JSON object per line with ``_id``, ``text``.
- ``qrels/{split}.tsv``: a header line (``query-id corpus-id score``), then one tab-separated
  judgement per line. ``score`` is an integer grade; 0 means judged *not* relevant.

Ids are strings (integer ids in JSON are converted with ``str``, since qrels ids are read as text).

What happens to imperfect data:
- malformed JSON, a missing or mistyped field, a duplicate id, a bad qrels line, an empty corpus:
  ``DataError`` (a ``ValueError``) naming the file, the line and the field; so do invalid UTF-8 and a
  corrupt ``.gz``.
- a qrels line naming a query or document that does not exist: dropped, counted, one warning.
- a query without any judgement in the split: dropped from evaluation, counted, logged.
- a query whose judgements are all 0 stays: it scores 0 on every metric, as in trec_eval and BEIR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from denselm.errors import DataError, InputNotFound
from denselm.io import iter_jsonl, iter_text_lines

logger = logging.getLogger(__name__)


@dataclass
class BeirStats:
    """Counts of what the loader kept and dropped, for logs and the metrics JSON."""

    num_docs: int = 0
    num_queries_in_file: int = 0
    num_queries_without_qrels: int = 0
    """queries in queries.jsonl with no judgement in this split: dropped from evaluation"""
    num_queries_without_relevant: int = 0
    """kept queries whose judgements are all <= 0 (they score 0 on every metric)"""
    num_judgements: int = 0
    num_unknown_query_judgements: int = 0
    """qrels lines naming a query id absent from queries.jsonl (dropped)"""
    num_unknown_doc_judgements: int = 0
    """qrels lines naming a document id absent from corpus.jsonl (dropped)"""
    num_duplicate_judgements: int = 0
    """qrels lines repeating an earlier (query, document, grade) exactly (ignored)"""


@dataclass
class BeirData:
    """One BEIR dataset split, ready to encode. Queries are only those with judgements."""

    corpus_ids: list[str]
    corpus_texts: list[str]
    """documents as ``format_document(title, text)``"""
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    """query id -> document id -> grade (> 0 relevant, <= 0 judged not relevant)"""
    split: str = "test"
    stats: BeirStats = field(default_factory=BeirStats)


def format_document(title: str, text: str) -> str:
    """The text a document is encoded as: ``"title text"`` joined by one space, or ``text`` alone.

    A blank title is left out entirely (BEIR's own dense search would prepend a lone space).
    """
    return f"{title} {text}" if title.strip() else text


def _get_id(obj: dict, path: Path, line_no: int) -> str:
    if "_id" not in obj:
        raise DataError(f"{path}:{line_no}: missing field '_id'")
    value = obj["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path}:{line_no}: field '_id' must be a string, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise DataError(f"{path}:{line_no}: field '_id' is empty")
    return value


def _get_text(obj: dict, name: str, path: Path, line_no: int, required: bool) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise DataError(f"{path}:{line_no}: missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{line_no}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _read_id_text_file(path: Path, with_title: bool) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}  # id -> line where it first appeared, for duplicate messages
    for line_no, obj in iter_jsonl(path):
        doc_id = _get_id(obj, path, line_no)
        if doc_id in first_line:
            raise DataError(f"{path}:{line_no}: duplicate _id {doc_id!r} (first on line {first_line[doc_id]})")
        first_line[doc_id] = line_no
        text = _get_text(obj, "text", path, line_no, required=True)
        if with_title:
            text = format_document(_get_text(obj, "title", path, line_no, required=False), text)
        ids.append(doc_id)
        texts.append(text)
    return ids, texts


def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
    """Read ``corpus.jsonl`` -> (ids, texts formatted by ``format_document``). Empty corpus: ValueError."""
    path = Path(path)
    ids, texts = _read_id_text_file(path, with_title=True)
    if not ids:
        raise DataError(f"{path}: empty corpus (no documents)")
    return ids, texts


def read_queries(path: str | Path) -> tuple[list[str], list[str]]:
    """Read ``queries.jsonl`` -> (ids, texts)."""
    return _read_id_text_file(Path(path), with_title=False)


def read_qrels(path: str | Path, stats: BeirStats | None = None) -> dict[str, dict[str, int]]:
    """Read ``qrels/{split}.tsv`` (header line, then ``query-id<TAB>corpus-id<TAB>score``).

    The header is required: a first line whose third column is a number is an error rather than a
    silently skipped judgement. A repeated (query, document) with the same grade is ignored and
    counted; with a different grade it is an error.
    """
    path = Path(path)
    stats = stats if stats is not None else BeirStats()
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    lines = iter_text_lines(path)
    header = next(lines, (1, ""))[1]
    header_cols = header.split("\t")
    if len(header_cols) == 3 and _parse_int(header_cols[2]) is not None:
        raise DataError(
            f"{path}:1: expected a header line 'query-id<TAB>corpus-id<TAB>score', got a judgement {header.strip()!r}"
        )
    for line_no, line in lines:
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) != 3:
            raise DataError(
                f"{path}:{line_no}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}"
            )
        qid, did, raw_score = (c.strip() for c in cols)
        if not qid or not did:
            raise DataError(f"{path}:{line_no}: empty {'query-id' if not qid else 'corpus-id'}")
        score = _parse_int(raw_score)
        if score is None:
            raise DataError(f"{path}:{line_no}: field 'score' must be an integer, got {raw_score!r}")
        judged = qrels.setdefault(qid, {})
        if did in judged:
            if judged[did] != score:
                raise DataError(
                    f"{path}:{line_no}: conflicting grade {score} for ({qid!r}, {did!r}); "
                    f"line {first_line[qid, did]} gave {judged[did]}"
                )
            stats.num_duplicate_judgements += 1
            continue
        judged[did] = score
        first_line[qid, did] = line_no
        stats.num_judgements += 1
    if stats.num_duplicate_judgements:
        logger.warning("%s: %d repeated judgements ignored", path, stats.num_duplicate_judgements)
    return qrels


def _parse_int(text: str) -> int | None:
    """'2' -> 2, '1.0' -> 1 (some qrels write floats), anything else -> None."""
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() else None


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Load one split of a BEIR dataset folder, keeping only queries with judgements."""
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise InputNotFound(f"{path} not found (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise InputNotFound(f"{qrels_path} not found (--split {split}); available splits: {splits or 'none'}")

    stats = BeirStats()
    corpus_ids, corpus_texts = read_corpus(corpus_path)
    query_ids_all, query_texts_all = read_queries(queries_path)
    qrels_raw = read_qrels(qrels_path, stats)
    stats.num_docs = len(corpus_ids)
    stats.num_queries_in_file = len(query_ids_all)

    # Drop judgements naming unknown ids (BEIR's loader keeps them silently; they would make
    # recall unreachable or evaluate queries that are never searched).
    doc_set, query_set = set(corpus_ids), set(query_ids_all)
    qrels: dict[str, dict[str, int]] = {}
    unknown_q_examples: list[str] = []
    unknown_d_examples: list[str] = []
    for qid, judged in qrels_raw.items():
        if qid not in query_set:
            stats.num_unknown_query_judgements += len(judged)
            unknown_q_examples.append(qid)
            continue
        kept = {}
        for did, grade in judged.items():
            if did in doc_set:
                kept[did] = grade
            else:
                stats.num_unknown_doc_judgements += 1
                unknown_d_examples.append(did)
        if kept:
            qrels[qid] = kept
    if stats.num_unknown_query_judgements:
        logger.warning(
            "%s: %d judgements name query ids missing from %s (dropped), e.g. %s",
            qrels_path, stats.num_unknown_query_judgements, queries_path.name, unknown_q_examples[:3],
        )
    if stats.num_unknown_doc_judgements:
        logger.warning(
            "%s: %d judgements name document ids missing from %s (dropped), e.g. %s",
            qrels_path, stats.num_unknown_doc_judgements, corpus_path.name, unknown_d_examples[:3],
        )

    query_ids, query_texts = [], []
    for qid, text in zip(query_ids_all, query_texts_all):
        if qid in qrels:
            query_ids.append(qid)
            query_texts.append(text)
    stats.num_queries_without_qrels = len(query_ids_all) - len(query_ids)
    stats.num_queries_without_relevant = sum(1 for q in query_ids if not any(g > 0 for g in qrels[q].values()))
    if stats.num_queries_without_qrels:
        logger.info("%s: %d of %d queries have no judgements in split %r; not evaluated",
                    queries_path, stats.num_queries_without_qrels, len(query_ids_all), split)
    if stats.num_queries_without_relevant:
        logger.info("%s: %d queries have no relevant document (all grades <= 0); they score 0",
                    qrels_path, stats.num_queries_without_relevant)
    if not query_ids:
        raise DataError(f"{qrels_path}: no query of {queries_path} has a judgement in split {split!r}")
    return BeirData(corpus_ids, corpus_texts, query_ids, query_texts, qrels, split, stats)
