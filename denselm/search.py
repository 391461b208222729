"""Inner-product search over embeddings (exact in torch, or FAISS indexes) and TREC run files.

    denselm search --queries q_emb/ --corpus c_emb/ --output run.trec --k 100 --index exact

- ``exact_search``: chunked matrix product + running top-k in torch (CPU or GPU); the full
  queries x corpus score matrix is never held in memory. Deterministic: equal scores are ordered
  by lower corpus index.
- ``build_index`` / ``search_index``: FAISS flat (IndexFlatIP), IVF (IndexIVFFlat) and HNSW
  (IndexHNSWFlat), all inner product; ``save_index`` / ``load_index``.
- ``topk_to_run``: search output -> query id -> doc id -> score.

Embedding folders (what ``encode`` writes and this reads) are ``denselm.embeddings``; TREC run files
are read and written by ``denselm.io``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

from .embeddings import load_embeddings
from .errors import DataError, InputNotFound, UserError
from .io import atomic_file, check_writable, remove_stale_temps, write_trec_run

INDEX_KINDS = ("exact", "flat", "ivf", "hnsw")


# ---------------------------------------------------------------------------------------------
# exact search


def _as_float32_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    # float16 inputs are upcast: CPU half matmuls are slow and the scores would lose precision.
    return t.float()


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``scores`` [q, c], equal scores ordered by lower column.

    torch.topk picks arbitrarily among entries tied with the k-th value. Taking k+1 values shows
    whether such a tie exists (the (k+1)-th equals the k-th); those rows are redone with a stable
    sort (rare outside duplicate documents). Returns (values [q, k'], columns [q, k']) with
    k' = min(k, c), values descending.
    """
    if scores.shape[1] <= k:  # the whole chunk is kept: no boundary to get wrong
        return scores.sort(dim=1, descending=True, stable=True)
    values, columns = scores.topk(k + 1, dim=1)  # [q, k+1] each, sorted descending
    overflow = values[:, k - 1] == values[:, k]  # [q] rows whose k-th place is tied with an entry left out
    values, columns = values[:, :k], columns[:, :k]
    if overflow.any():
        rows = overflow.nonzero().squeeze(1)
        sorted_values, sorted_columns = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows] = sorted_values[:, :k]
        columns[rows] = sorted_columns[:, :k]
    return values, columns


def _raise_nan(queries: torch.Tensor, chunk: torch.Tensor, query_offset: int, doc_offset: int) -> None:
    bad_q = ((~torch.isfinite(queries)).any(dim=1).nonzero().squeeze(1) + query_offset).tolist()
    bad_d = ((~torch.isfinite(chunk)).any(dim=1).nonzero().squeeze(1) + doc_offset).tolist()
    raise DataError(
        f"NaN scores: NaN/inf in query rows {bad_q[:5]}, corpus rows {bad_d[:5]} (overflow in fp16 encoding?)"
    )


def _merge_topk(
    values: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k best of candidates [q, m] ordered by (score descending, index ascending)."""
    indices, order = indices.sort(dim=1)  # corpus indices are unique within a row
    values = values.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)  # stable: lower index first
    return values[:, :k], indices.gather(1, order)[:, :k]


def exact_search(
    queries: np.ndarray | torch.Tensor,
    corpus: np.ndarray | torch.Tensor,
    k: int,
    chunk_size: int = 32768,
    device: str | torch.device | None = None,
    query_batch_size: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over the corpus.

    Scores are computed block by block (``query_batch_size`` x ``chunk_size`` at a time, float32:
    256 MiB with the defaults) and merged into a running top-k, so memory is
    O(Q k + query_batch_size chunk_size), never O(Q N). Ties are broken by the lower corpus
    index, so results are deterministic and independent of ``chunk_size``. NaN scores (e.g. from
    fp16 overflow in the encoder) raise ValueError instead of silently ranking first.

    Shape:
        queries [Q, d], corpus [N, d] (numpy or torch, float32/float16)
        -> scores [Q, min(k, N)] float32 descending, indices [Q, min(k, N)] int64

    ``device``: where to compute; None = CUDA when available, else CPU. Corpus chunks are moved
    there one at a time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1 or query_batch_size < 1:
        raise ValueError("chunk_size and query_batch_size must be >= 1")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    q = _as_float32_tensor(queries, "queries").to(device)
    c = torch.as_tensor(corpus)
    if c.ndim != 2:
        raise ValueError(f"corpus must be 2-D [n, dim], got shape {tuple(c.shape)}")
    if c.shape[1] != q.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {q.shape[1]}, corpus has {c.shape[1]}")
    num_queries, num_docs = q.shape[0], c.shape[0]
    if num_docs == 0:
        raise ValueError("corpus is empty")
    k = min(k, num_docs)

    # Running top-k of every query; starts empty and grows to k columns.
    best_values = torch.empty((num_queries, 0), dtype=torch.float32, device=device)
    best_indices = torch.empty((num_queries, 0), dtype=torch.int64, device=device)
    # Outer loop over corpus chunks so each chunk is transferred to the device once.
    for start in range(0, num_docs, chunk_size):
        chunk = c[start : start + chunk_size].to(device=device, dtype=torch.float32)  # [c, d]
        new_values, new_indices = [], []
        for qs in range(0, num_queries, query_batch_size):
            scores = q[qs : qs + query_batch_size] @ chunk.T  # [b, c]
            values, columns = _chunk_topk(scores, k)
            if torch.isnan(values).any():  # topk ranks NaN above everything, so a NaN shows up here
                _raise_nan(q[qs : qs + query_batch_size], chunk, qs, start)
            merged = _merge_topk(
                torch.cat([best_values[qs : qs + query_batch_size], values], dim=1),
                torch.cat([best_indices[qs : qs + query_batch_size], columns + start], dim=1),
                k,
            )
            new_values.append(merged[0])
            new_indices.append(merged[1])
        if num_queries:
            best_values, best_indices = torch.cat(new_values), torch.cat(new_indices)
    if num_queries == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return best_values.cpu().numpy(), best_indices.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# FAISS indexes


def default_nlist(num_docs: int) -> int:
    """IVF clusters: 4 sqrt(N) (FAISS's rule of thumb), capped so each cluster gets >= 39
    training points (FAISS warns below that), and at least 1."""
    return max(1, min(int(4 * num_docs**0.5), num_docs // 39))


def build_index(
    corpus: np.ndarray,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 32,
    m: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
):
    """Build a FAISS inner-product index over ``corpus`` [N, d] (normalise first for cosine).

    kind: ``flat`` (IndexFlatIP, exact), ``ivf`` (IndexIVFFlat over ``nlist`` k-means clusters,
    ``nprobe`` probed per query; default nlist from ``default_nlist``), ``hnsw`` (IndexHNSWFlat,
    ``m`` links per node, ``ef_construction``/``ef_search`` beam widths).
    """
    import faiss

    x = np.ascontiguousarray(corpus, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"corpus must be a non-empty 2-D array, got shape {x.shape}")
    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or default_nlist(x.shape[0])
        if nlist > x.shape[0]:
            raise UserError(f"--nlist {nlist} exceeds the corpus size {x.shape[0]}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)  # k-means with FAISS's fixed seed: deterministic for a given thread count
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise UserError(f"--index must be one of flat, ivf, hnsw for FAISS, got {kind!r}")
    index.add(x)
    return index


def search_index(
    index, queries: np.ndarray, k: int, *, nprobe: int | None = None, ef_search: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Search a FAISS index -> (scores [Q, min(k, N)] float32, indices [Q, min(k, N)] int64).

    Ties are in FAISS's order (not guaranteed). An IVF search that probes too few clusters can
    find fewer than k hits: the missing slots have index -1 (and score -inf or FAISS's lowest value).
    """
    import faiss

    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = min(nprobe, index.nlist)
    if ef_search is not None and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search
    x = np.ascontiguousarray(queries, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"queries must be [Q, {index.d}], got shape {x.shape}")
    k = min(k, index.ntotal)
    scores, indices = index.search(x, k)
    return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


def save_index(index, path: str | Path) -> None:
    """Write a FAISS index (with its nprobe / efSearch) atomically."""
    import faiss

    # faiss writes by file name; serialising to bytes lets the io layer do the atomic write
    with atomic_file(path) as f:
        f.write(faiss.serialize_index(index).tobytes())


def load_index(path: str | Path):
    import faiss

    if not Path(path).is_file():
        raise InputNotFound(f"{path}: no FAISS index file")
    return faiss.read_index(str(path))


def search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    kind: str = "exact",
    *,
    device: str | None = None,
    **index_options,
) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch: ``kind="exact"`` -> ``exact_search``; flat/ivf/hnsw -> build a FAISS index and search."""
    if kind == "exact":
        return exact_search(queries, corpus, k, device=device)
    return search_index(build_index(corpus, kind, **index_options), queries, k)


# ---------------------------------------------------------------------------------------------
# TREC run files


def topk_to_run(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores: np.ndarray,
    indices: np.ndarray,
    ignore_identical_ids: bool = False,
    k: int | None = None,
) -> dict[str, dict[str, float]]:
    """Turn search output (scores/indices [Q, k]) into a run: query id -> doc id -> score.

    ``ignore_identical_ids`` drops hits whose doc id equals the query id (BEIR does this for
    datasets such as ArguAna and Quora where queries are also documents); search k+1 hits to keep
    k. Slots with index -1 (FAISS found nothing) are skipped. ``k`` caps the hits kept per query.
    """
    if scores.shape != indices.shape or scores.shape[0] != len(query_ids):
        raise ValueError(f"scores {scores.shape} / indices {indices.shape} do not match {len(query_ids)} queries")
    run: dict[str, dict[str, float]] = {}
    for qid, row_scores, row_indices in zip(query_ids, scores, indices):
        hits: dict[str, float] = {}
        for score, idx in zip(row_scores.tolist(), row_indices.tolist()):
            if idx < 0:
                continue
            did = doc_ids[idx]
            if ignore_identical_ids and did == qid:
                continue
            hits[did] = score
            if k is not None and len(hits) >= k:
                break
        run[qid] = hits
    return run


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--queries", required=True, help="query embedding folder (from denselm encode)")
    parser.add_argument("--corpus", required=True, help="corpus embedding folder (from denselm encode)")
    parser.add_argument("--output", required=True, help="TREC run file to write")
    parser.add_argument("--k", type=int, default=100, help="hits per query (default 100)")
    parser.add_argument("--index", choices=INDEX_KINDS, default="exact",
                        help="exact (torch, deterministic), or a FAISS index: flat, ivf, hnsw (default exact)")
    parser.add_argument("--index-file", default=None,
                        help="FAISS index path: loaded when it exists, else built and saved there")
    parser.add_argument("--nlist", type=int, default=None, help="IVF clusters (default 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF clusters probed per query (default 32)")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    parser.add_argument("--ef-construction", type=int, default=200, help="HNSW build beam (default 200)")
    parser.add_argument("--ef-search", type=int, default=128, help="HNSW search beam (default 128)")
    parser.add_argument("--ignore-identical-ids", action="store_true",
                        help="drop hits whose document id equals the query id (BEIR's ArguAna/Quora rule)")
    parser.add_argument("--device", default=None, help="exact search device (default: cuda if available)")
    parser.add_argument("--chunk-size", type=int, default=32768, help="exact search corpus chunk (default 32768)")
    parser.add_argument("--tag", default="denselm", help="run tag, last column (default denselm)")


def run(args) -> int:
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.index_file and args.index == "exact":
        raise UserError("--index-file needs a FAISS --index (flat, ivf or hnsw)")
    check_writable(args.output)  # before reading (possibly large) embeddings
    remove_stale_temps(Path(args.output).parent, target=Path(args.output).name)  # a killed earlier write's temp
    query_ids, query_emb = load_embeddings(args.queries)
    doc_ids, doc_emb = load_embeddings(args.corpus)
    if query_emb.shape[1] != doc_emb.shape[1]:
        raise UserError(f"--queries have dimension {query_emb.shape[1]} but --corpus has {doc_emb.shape[1]}")
    depth = args.k + 1 if args.ignore_identical_ids else args.k  # one spare for the dropped self-hit
    logger.info("searching %d queries over %d documents (dim %d, %s, k=%d)",
                len(query_ids), len(doc_ids), doc_emb.shape[1], args.index, args.k)
    if args.index == "exact":
        scores, indices = exact_search(query_emb, doc_emb, depth, chunk_size=args.chunk_size, device=args.device)
    else:
        if args.index_file and Path(args.index_file).is_file():
            index = load_index(args.index_file)
            if index.ntotal != len(doc_ids) or index.d != doc_emb.shape[1]:
                raise UserError(
                    f"--index-file {args.index_file} holds {index.ntotal} x {index.d} vectors but --corpus has "
                    f"{len(doc_ids)} x {doc_emb.shape[1]}; delete it to rebuild"
                )
        else:
            index = build_index(doc_emb, args.index, nlist=args.nlist, nprobe=args.nprobe, m=args.hnsw_m,
                                ef_construction=args.ef_construction, ef_search=args.ef_search)
            if args.index_file:
                save_index(index, args.index_file)
        scores, indices = search_index(index, query_emb, depth, nprobe=args.nprobe, ef_search=args.ef_search)
    result = topk_to_run(query_ids, doc_ids, scores, indices, args.ignore_identical_ids, k=args.k)
    write_trec_run(args.output, result, tag=args.tag)
    logger.info("wrote %s (%d queries)", args.output, len(result))
    return 0
