"""Reference systems for the demo table: BM25 (bm25s) and a sentence-transformers encoder.

    from denselm.baselines import bm25_run, st_run
    run = bm25_run(corpus_ids, corpus_texts, query_ids, query_texts, k=100)

Both return a run as ``{query_id: {doc_id: score}}`` (what ir_measures and
pytrec_eval read), holding each query's top ``k`` documents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from denselm.errors import InputNotFound

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


def english_stemmer():
    """PyStemmer's English (Porter2) stemmer when installed, else None."""
    try:
        import Stemmer  # PyStemmer: optional, C extension
    except ImportError:
        return None
    return Stemmer.Stemmer("english")


def bm25_tokenize(texts: Sequence[str], stemmer=None, stopwords: str | None = "en") -> list[list[str]]:
    """bm25s's tokenizer: lowercase words of 2+ word characters, English stopwords removed, optional stemming."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=stopwords, stemmer=stemmer, return_ids=False, show_progress=False)


def bm25_run(
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    k: int = 100,
    *,
    stemmer=None,
    stopwords: str | None = "en",
    k1: float = 1.5,
    b: float = 0.75,
) -> Run:
    """Top-``k`` BM25 (Lucene variant) documents per query; documents scoring 0 are left out.

    ``stemmer``: None (plain lowercase words: the reference numbers), ``"english"``
    (PyStemmer's Porter2, which must be installed), or any callable on a list of words.
    """
    import bm25s

    if len(corpus_ids) != len(corpus_texts) or len(query_ids) != len(query_texts):
        raise ValueError("bm25_run: ids and texts must have the same lengths")
    if not corpus_texts:
        raise ValueError("bm25_run: empty corpus")
    if stemmer == "english":
        stemmer = english_stemmer()
        if stemmer is None:
            raise ImportError("stemmer='english' needs PyStemmer: pip install PyStemmer")
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(bm25_tokenize(corpus_texts, stemmer, stopwords), show_progress=False)
    k = min(k, len(corpus_ids))
    query_tokens = bm25_tokenize(query_texts, stemmer, stopwords)
    run: Run = {}
    # bm25s rejects an empty token list; such a query (only stopwords) retrieves nothing
    nonempty = [i for i, toks in enumerate(query_tokens) if toks]
    for qid in query_ids:
        run[qid] = {}
    if nonempty:
        docs, scores = retriever.retrieve(
            [query_tokens[i] for i in nonempty], k=k, show_progress=False, n_threads=1
        )
        for row, i in enumerate(nonempty):
            run[query_ids[i]] = {
                corpus_ids[int(d)]: float(s) for d, s in zip(docs[row], scores[row]) if s > 0
            }
    return run


def top_k_run(
    scores: np.ndarray, corpus_ids: Sequence[str], query_ids: Sequence[str], k: int
) -> Run:
    """Run from a dense (Q, D) score matrix: each row's ``k`` best documents."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
    return {
        qid: {corpus_ids[int(d)]: float(scores[row, d]) for d in top[row]}
        for row, qid in enumerate(query_ids)
    }


def st_encode(model, texts: Sequence[str], batch_size: int = 32, prompt: str | None = None) -> np.ndarray:
    """(N, dim) L2-normalised sentence-transformers embeddings."""
    return model.encode(
        list(texts),
        batch_size=batch_size,
        prompt=prompt,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(texts) > 1000,
    )


def load_sentence_transformer(model_dir: str | Path, device: str = "cpu"):
    """A local sentence-transformers folder, loaded without touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        raise InputNotFound(f"{model_dir}: not a sentence-transformers folder (no modules.json)")
    return SentenceTransformer(str(model_dir), device=device)


def st_run(
    model_dir,
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    k: int = 100,
    *,
    batch_size: int = 32,
    query_prompt: str | None = None,
) -> Run:
    """Top-``k`` documents by cosine similarity of a sentence-transformers model (a folder or a loaded model)."""
    model = load_sentence_transformer(model_dir) if isinstance(model_dir, (str, Path)) else model_dir
    docs = st_encode(model, corpus_texts, batch_size)
    queries = st_encode(model, query_texts, batch_size, prompt=query_prompt)
    return top_k_run(queries @ docs.T, corpus_ids, query_ids, k)
