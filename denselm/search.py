"""Inner-product search over embeddings (exact in torch, or FAISS indexes) and TREC run files.

    denselm search --queries q_emb/ --corpus c_emb/ --output run.trec --k 100 --index exact

- ``exact_search``: chunked matrix product + running top-k in torch (CPU or GPU); the full
  queries x corpus score matrix is never held in memory. Deterministic: equal scores are ordered
  by lower corpus index.
- ``build_index`` / ``search_index``: FAISS flat (IndexFlatIP), IVF (IndexIVFFlat) and HNSW
  (IndexHNSWFlat), all inner product; ``save_index`` / ``load_index``.
- Embedding folders (written by ``denselm encode``): ``shard-00000.npy`` (float32 or float16,
  [n, d]) + ``shard-00000.ids.json`` (list of string ids), ..., and ``manifest.json``, written
  last, which marks the folder complete. See ``save_embedding_shard`` / ``write_embedding_manifest``
  / ``load_embeddings``.
- TREC runs: ``qid Q0 docid rank score tag`` lines; ``write_trec_run`` / ``read_trec_run``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

INDEX_KINDS = ("exact", "flat", "ivf", "hnsw")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "denselm.embeddings"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npy$")


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
    raise ValueError(
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
            raise ValueError(f"--nlist {nlist} exceeds the corpus size {x.shape[0]}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)  # k-means with FAISS's fixed seed: deterministic for a given thread count
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"--index must be one of flat, ivf, hnsw for FAISS, got {kind!r}")
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


def _atomic_path(path: Path) -> Path:
    """A temp file name in the same folder (so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_index(index, path: str | Path) -> None:
    """Write a FAISS index (with its nprobe / efSearch) atomically."""
    import faiss

    path = Path(path)
    tmp = _atomic_path(path)
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_index(path: str | Path):
    import faiss

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no FAISS index file")
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
# embedding shards


def shard_paths(folder: str | Path, index: int) -> tuple[Path, Path]:
    """(array path, ids path) of shard ``index``: shard-00000.npy, shard-00000.ids.json."""
    folder = Path(folder)
    return folder / f"shard-{index:05d}.npy", folder / f"shard-{index:05d}.ids.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text via a temp file in the same folder + os.replace: readers never see half a file."""
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_embedding_shard(
    folder: str | Path, index: int, ids: Sequence[str], array: np.ndarray
) -> Path:
    """Write shard ``index`` of an embedding folder: ids first, then the array, each atomically.

    The ``.npy`` file appears last, so a shard whose ``.npy`` exists is complete (an interrupted
    encode can resume at the first missing ``.npy``). float32 and float16 are kept as given.
    Returns the array's path.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"shard {index}: embeddings must be 2-D [n, dim], got shape {array.shape}")
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"shard {index}: embeddings must be float32 or float16, got {array.dtype}")
    ids = [str(i) for i in ids]
    if len(ids) != array.shape[0]:
        raise ValueError(f"shard {index}: {len(ids)} ids for {array.shape[0]} embeddings")
    npy_path, ids_path = shard_paths(folder, index)
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(ids_path, json.dumps(ids, ensure_ascii=False))
    tmp = _atomic_path(npy_path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, npy_path)
    finally:
        tmp.unlink(missing_ok=True)
    return npy_path


def list_shards(folder: str | Path) -> list[int]:
    """Indices of the complete shards (``.npy`` present) in ascending order."""
    return sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := _SHARD_RE.match(p.name)))


def write_embedding_manifest(folder: str | Path, info: dict | None = None) -> dict:
    """Write ``manifest.json`` (last, atomically) describing the shards now in ``folder``.

    Fields: format, version, num_shards, count, dim, dtype, plus ``info`` (e.g. model, kind of
    texts, instruction). Shards must be numbered 0..n-1 without gaps. Returns the manifest.
    """
    folder = Path(folder)
    shards = list_shards(folder)
    if shards != list(range(len(shards))):
        raise ValueError(f"{folder}: shards must be numbered 0..n-1 without gaps, found {shards}")
    count, dims, dtypes = 0, set(), set()
    for i in shards:
        arr = np.load(shard_paths(folder, i)[0], mmap_mode="r")  # header only, no data read
        count += arr.shape[0]
        dims.add(int(arr.shape[1]))
        dtypes.add(str(arr.dtype))
    if len(dims) > 1:
        raise ValueError(f"{folder}: shards have different dimensions {sorted(dims)}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "num_shards": len(shards),
        "count": count,
        "dim": dims.pop() if dims else None,
        "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        **(info or {}),
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2))
    return manifest


def load_embeddings(folder: str | Path, require_manifest: bool = True) -> tuple[list[str], np.ndarray]:
    """Read an embedding folder -> (ids, embeddings [N, d] float32), in shard order.

    Without ``manifest.json`` the folder is treated as incomplete (an encode still running or
    interrupted) and refused unless ``require_manifest=False``. Checks: shard numbering, the
    manifest's counts, ids matching rows, duplicate ids across shards.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: embedding folder not found")
    manifest_path = folder / MANIFEST_NAME
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path}: malformed JSON ({err.msg})") from None
    elif require_manifest:
        raise ValueError(
            f"{folder}: no {MANIFEST_NAME}; the encode that writes it did not finish (rerun it to resume)"
        )
    shards = list_shards(folder)
    if not shards:
        raise ValueError(f"{folder}: no shard-*.npy files")
    if shards != list(range(len(shards))):
        raise ValueError(f"{folder}: shards must be numbered 0..n-1 without gaps, found {shards}")
    if manifest is not None and manifest.get("num_shards") != len(shards):
        raise ValueError(
            f"{manifest_path}: field 'num_shards' is {manifest.get('num_shards')} but {len(shards)} shards exist"
        )

    arrays = [np.load(shard_paths(folder, i)[0], mmap_mode="r") for i in shards]  # lazy, no copy yet
    dims = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if len(dims) != 1 or None in dims:
        raise ValueError(f"{folder}: shards must all be 2-D with one dimension, got shapes {[a.shape for a in arrays]}")
    total = sum(a.shape[0] for a in arrays)
    if manifest is not None and manifest.get("count") not in (None, total):
        raise ValueError(f"{manifest_path}: field 'count' is {manifest['count']} but shards hold {total} rows")

    ids: list[str] = []
    out = np.empty((total, dims.pop()), dtype=np.float32)  # filled shard by shard: one copy in memory
    row = 0
    for i, arr in zip(shards, arrays):
        ids_path = shard_paths(folder, i)[1]
        if not ids_path.is_file():
            raise ValueError(f"{ids_path}: missing (every shard-NNNNN.npy needs its .ids.json)")
        shard_ids = json.loads(ids_path.read_text(encoding="utf-8"))
        if not isinstance(shard_ids, list) or len(shard_ids) != arr.shape[0]:
            n = len(shard_ids) if isinstance(shard_ids, list) else type(shard_ids).__name__
            raise ValueError(f"{ids_path}: expected a list of {arr.shape[0]} ids, got {n}")
        ids.extend(str(x) for x in shard_ids)
        out[row : row + arr.shape[0]] = arr
        row += arr.shape[0]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for x in ids:
            if x in seen:
                dup = x
                break
            seen.add(x)
        raise ValueError(f"{folder}: duplicate id {dup!r} across shards")
    return ids, out


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


def write_trec_run(path: str | Path, run: dict[str, dict[str, float]], tag: str = "denselm") -> None:
    """Write ``qid Q0 docid rank score tag`` lines, atomically.

    Within a query, lines are in trec_eval's order (score descending, then doc id descending), so
    the rank column agrees with how trec_eval and ``denselm.evaluate`` read the file. Scores are
    written with 9 significant digits (round-trips float32).
    """
    if not tag or any(ch.isspace() for ch in tag):
        raise ValueError(f"--tag must be one word without spaces, got {tag!r}")
    lines = []
    for qid, hits in run.items():
        ordered = sorted(hits.items(), key=lambda item: (item[1], item[0]), reverse=True)
        for rank, (did, score) in enumerate(ordered, start=1):
            lines.append(f"{qid} Q0 {did} {rank} {score:.9g} {tag}\n")
    atomic_write_text(path, "".join(lines))


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a TREC run file -> query id -> doc id -> score (the rank column is not used, as in trec_eval)."""
    path = Path(path)
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            cols = line.split()
            if len(cols) != 6:
                raise ValueError(f"{path}:{line_no}: expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
            qid, _, did, _, raw_score, _ = cols
            try:
                score = float(raw_score)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: field 'score' is not a number: {raw_score!r}") from None
            hits = run.setdefault(qid, {})
            if did in hits:
                raise ValueError(f"{path}:{line_no}: document {did!r} listed twice for query {qid!r}")
            hits[did] = score
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
    from denselm.cli import CliError

    if args.k < 1:
        raise CliError(f"--k must be >= 1, got {args.k}")
    if args.index_file and args.index == "exact":
        raise CliError("--index-file needs a FAISS --index (flat, ivf or hnsw)")
    query_ids, query_emb = load_embeddings(args.queries)
    doc_ids, doc_emb = load_embeddings(args.corpus)
    if query_emb.shape[1] != doc_emb.shape[1]:
        raise CliError(f"--queries have dimension {query_emb.shape[1]} but --corpus has {doc_emb.shape[1]}")
    depth = args.k + 1 if args.ignore_identical_ids else args.k  # one spare for the dropped self-hit
    logger.info("searching %d queries over %d documents (dim %d, %s, k=%d)",
                len(query_ids), len(doc_ids), doc_emb.shape[1], args.index, args.k)
    if args.index == "exact":
        scores, indices = exact_search(query_emb, doc_emb, depth, chunk_size=args.chunk_size, device=args.device)
    else:
        if args.index_file and Path(args.index_file).is_file():
            index = load_index(args.index_file)
            if index.ntotal != len(doc_ids) or index.d != doc_emb.shape[1]:
                raise CliError(
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
