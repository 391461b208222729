"""Search: exact torch top-k (ties, chunking), FAISS indexes, embedding shards, TREC runs, the CLI."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from denselm.cli import main as cli_main
from denselm.embeddings import list_shards, load_embeddings, save_embedding_shard, write_embedding_manifest
from denselm.io import read_trec_run, write_trec_run
from denselm.search import (
    build_index,
    exact_search,
    load_index,
    save_index,
    search,
    search_index,
    topk_to_run,
)


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_topk(queries, corpus, k):
    """Full score matrix in float64; order by (score desc, index asc) via lexsort."""
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T  # [Q, N]
    n = corpus.shape[0]
    order = np.stack([np.lexsort((np.arange(n), -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("chunk_size, query_batch_size", [(1000, 4096), (37, 5), (3, 2)])
def test_exact_search_matches_full_matrix(chunk_size, query_batch_size):
    q, c = unit(23, 16, 0), unit(300, 16, 1)
    scores, idx = exact_search(q, c, 10, chunk_size=chunk_size, device="cpu", query_batch_size=query_batch_size)
    ref_scores, ref_idx = reference_topk(q, c, 10)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and scores.shape == (23, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_exact_search_ties_go_to_lower_index(chunk_size):
    # Small-integer vectors: scores are exact integers with many ties, including ties that straddle
    # the k-th place inside a chunk (torch.topk alone would pick among them arbitrarily).
    rng = np.random.default_rng(3)
    c = rng.integers(0, 2, size=(60, 3)).astype(np.float32)
    q = rng.integers(0, 3, size=(9, 3)).astype(np.float32)
    scores, idx = exact_search(q, c, 12, chunk_size=chunk_size, device="cpu")
    ref_scores, ref_idx = reference_topk(q, c, 12)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores)


def test_exact_search_all_identical_documents():
    c = np.ones((50, 4), np.float32)
    _, idx = exact_search(np.ones((2, 4), np.float32), c, 5, chunk_size=8, device="cpu")
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4]] * 2)


def test_exact_search_nan_embeddings_are_an_error():
    c = unit(20, 4, 0)
    c[13, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in query rows \[\], corpus rows \[13\]"):
        exact_search(unit(3, 4, 1), c, 5, chunk_size=8, device="cpu")


def test_exact_search_inputs_and_shapes():
    q, c = unit(4, 8, 0), unit(6, 8, 1)
    ref_scores, ref_idx = reference_topk(q, c, 6)
    scores, idx = exact_search(torch.from_numpy(q), c.astype(np.float16), 100, device="cpu")  # k > N: clamped
    assert idx.shape == (4, 6)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-3)  # float16 corpus
    with pytest.raises(ValueError, match="dimension mismatch"):
        exact_search(q, unit(6, 5, 1), 3, device="cpu")
    with pytest.raises(ValueError, match="k must be >= 1"):
        exact_search(q, c, 0, device="cpu")


def test_faiss_flat_ivf_hnsw_and_save_load(tmp_path):
    q, c = unit(20, 16, 0), unit(2000, 16, 1)
    exact_scores, exact_idx = exact_search(q, c, 10, device="cpu")

    flat_scores, flat_idx = search_index(build_index(c, "flat"), q, 10)
    np.testing.assert_allclose(flat_scores, exact_scores, atol=1e-5)
    np.testing.assert_array_equal(flat_idx, exact_idx)  # random floats: no ties

    ivf = build_index(c, "ivf", nlist=16, nprobe=2)
    _, ivf_idx = search_index(ivf, q, 10, nprobe=16)  # probing every list is exhaustive
    np.testing.assert_array_equal(ivf_idx, exact_idx)
    save_index(ivf, tmp_path / "ivf.faiss")
    loaded = load_index(tmp_path / "ivf.faiss")
    assert loaded.nprobe == 16 and loaded.ntotal == 2000
    np.testing.assert_array_equal(search_index(loaded, q, 10)[1], exact_idx)
    assert [p.name for p in tmp_path.iterdir()] == ["ivf.faiss"]  # no temp file left

    hnsw = build_index(c, "hnsw", m=16, ef_search=256)
    hnsw_scores, hnsw_idx = search_index(hnsw, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw_idx.tolist(), exact_idx.tolist())])
    assert recall >= 0.95
    assert hnsw_scores.shape == (20, 10) and hnsw_idx.dtype == np.int64

    # dispatcher, and k > N clamps like exact_search
    assert search(q, c[:5], 10, "flat")[1].shape == (20, 5)
    with pytest.raises(ValueError, match="--index must be one of"):
        build_index(c, "lsh")


def test_embedding_shards_round_trip(tmp_path):
    folder = tmp_path / "emb"
    a = unit(3, 8, 0)
    b = unit(2, 8, 1).astype(np.float16)
    save_embedding_shard(folder, 0, ["a0", "a1", "a2"], a)
    save_embedding_shard(folder, 1, ["b0", "b1"], b)
    assert list_shards(folder) == [0, 1]
    with pytest.raises(ValueError, match="no manifest.json"):
        load_embeddings(folder)
    manifest = write_embedding_manifest(folder, {"model": "tiny"})
    assert manifest == {"format": "denselm.embeddings", "version": 1, "num_shards": 2, "count": 5, "dim": 8,
                        "dtype": ["float16", "float32"], "model": "tiny"}
    ids, emb = load_embeddings(folder)
    assert ids == ["a0", "a1", "a2", "b0", "b1"]
    assert emb.dtype == np.float32 and emb.shape == (5, 8)
    np.testing.assert_array_equal(emb[:3], a)
    np.testing.assert_array_equal(emb[3:], b.astype(np.float32))
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "shard-00000.ids.json", "shard-00000.npy", "shard-00001.ids.json", "shard-00001.npy"]


def test_embedding_shard_errors(tmp_path):
    with pytest.raises(ValueError, match="2 ids for 3 embeddings"):
        save_embedding_shard(tmp_path, 0, ["x", "y"], unit(3, 4, 0))
    with pytest.raises(ValueError, match="float32 or float16"):
        save_embedding_shard(tmp_path, 0, ["x"], np.zeros((1, 4), np.float64))

    gap = tmp_path / "gap"
    save_embedding_shard(gap, 0, ["x"], unit(1, 4, 0))
    save_embedding_shard(gap, 2, ["y"], unit(1, 4, 1))
    with pytest.raises(ValueError, match=r"without gaps, found \[0, 2\]"):
        load_embeddings(gap, require_manifest=False)

    dup = tmp_path / "dup"
    save_embedding_shard(dup, 0, ["x", "y"], unit(2, 4, 0))
    save_embedding_shard(dup, 1, ["y"], unit(1, 4, 1))
    write_embedding_manifest(dup)
    with pytest.raises(ValueError, match="duplicate id 'y' across shards"):
        load_embeddings(dup)

    stale = tmp_path / "stale"
    save_embedding_shard(stale, 0, ["x"], unit(1, 4, 0))
    write_embedding_manifest(stale)
    save_embedding_shard(stale, 1, ["y"], unit(1, 4, 1))  # written after the manifest
    with pytest.raises(ValueError, match="'num_shards' is 1 but 2 shards exist"):
        load_embeddings(stale)


def test_topk_to_run_and_trec_round_trip(tmp_path):
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.8, 0.7, 0.0, -1.0]], np.float32)
    indices = np.array([[1, 0, 2, 3], [2, 1, 0, -1]])
    doc_ids = ["q1", "d1", "d2", "d3"]
    run = topk_to_run(["q1", "q2"], doc_ids, scores, indices, ignore_identical_ids=True, k=2)
    assert run == {"q1": {"d1": pytest.approx(0.9), "d2": pytest.approx(0.5)},  # q1's self-hit dropped
                   "q2": {"d2": pytest.approx(0.8), "d1": pytest.approx(0.7)}}
    full = topk_to_run(["q1", "q2"], doc_ids, scores, indices)
    assert list(full["q2"]) == ["d2", "d1", "q1"]  # index -1 skipped

    path = tmp_path / "run.trec"
    write_trec_run(path, full, tag="test")
    lines = path.read_text().splitlines()
    # ties (q1 and d2 at 0.5) in trec_eval order: doc id descending
    assert lines[:4] == ["q1 Q0 d1 1 0.899999976 test", "q1 Q0 q1 2 0.5 test", "q1 Q0 d2 3 0.5 test",
                         "q1 Q0 d3 4 0.100000001 test"]
    back = read_trec_run(path)
    assert back.keys() == full.keys()
    for qid in full:
        assert back[qid] == pytest.approx(full[qid], abs=1e-7)

    path.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n")
    with pytest.raises(ValueError, match=r"run\.trec:2: document 'd1' listed twice"):
        read_trec_run(path)
    path.write_text("q1 Q0 d1 1 high t\n")
    with pytest.raises(ValueError, match=r"run\.trec:1: field 'score' is not a number"):
        read_trec_run(path)


def _write_folder(folder, ids, emb, shard_size):
    for i, start in enumerate(range(0, len(ids), shard_size)):
        save_embedding_shard(folder, i, ids[start : start + shard_size], emb[start : start + shard_size])
    write_embedding_manifest(folder)


@pytest.mark.parametrize("index", ["exact", "flat"])
def test_search_cli(tmp_path, index):
    docs, queries = unit(40, 8, 0), unit(5, 8, 1)
    queries[0] = docs[7]  # query "d7" is also document d7: its best hit is itself
    doc_ids = [f"d{i}" for i in range(40)]
    query_ids = ["d7", "qa", "qb", "qc", "qd"]
    _write_folder(tmp_path / "c", doc_ids, docs, 16)
    _write_folder(tmp_path / "q", query_ids, queries, 2)
    out = tmp_path / "run.trec"
    argv = ["search", "--queries", str(tmp_path / "q"), "--corpus", str(tmp_path / "c"), "--output", str(out),
            "--k", "3", "--index", index]
    assert cli_main(argv) == 0
    run = read_trec_run(out)
    ref_scores, ref_idx = reference_topk(queries, docs, 4)
    assert list(run) == query_ids and all(len(h) == 3 for h in run.values())
    assert set(run["qa"]) == {doc_ids[i] for i in ref_idx[1, :3]}
    assert next(iter(run["d7"])) == "d7"

    assert cli_main(argv + ["--ignore-identical-ids"]) == 0
    run = read_trec_run(out)
    assert set(run["d7"]) == {doc_ids[i] for i in ref_idx[0, 1:4]}  # self-hit dropped, still 3 hits
    assert len(run["qa"]) == 3


def test_search_cli_index_file_and_errors(tmp_path, capsys):
    docs = unit(30, 8, 0)
    _write_folder(tmp_path / "c", [f"d{i}" for i in range(30)], docs, 30)
    _write_folder(tmp_path / "q", ["x", "y"], docs[:2], 30)
    base = ["search", "--queries", str(tmp_path / "q"), "--corpus", str(tmp_path / "c"), "--k", "2"]
    idx = tmp_path / "ivf.faiss"
    ivf = base + ["--index", "ivf", "--nlist", "2", "--nprobe", "2", "--index-file", str(idx)]
    assert cli_main(ivf + ["--output", str(tmp_path / "a.trec")]) == 0
    assert idx.is_file()
    assert cli_main(ivf + ["--output", str(tmp_path / "b.trec")]) == 0  # loads the saved index
    assert read_trec_run(tmp_path / "a.trec") == read_trec_run(tmp_path / "b.trec")
    assert list(read_trec_run(tmp_path / "a.trec")["x"])[0] == "d0"

    (tmp_path / "c" / "manifest.json").unlink()
    assert cli_main(base + ["--output", str(tmp_path / "c.trec")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "c.trec").exists()


def test_benchmark_smoke(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "search_bench.py"
    spec = importlib.util.spec_from_file_location("search_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--size", "tiny", "--num-docs", "1000", "--repeats", "1", "--threads", "1",
                         "--nprobe", "31", "--ef-search", "64"])
    assert result["agreement"]["ok"] and result["agreement"]["id_mismatches_not_tied"] == 0
    assert result["exact_torch"]["qps"] > 0 and result["faiss_flat"]["qps"] > 0
    assert result["faiss_ivf"]["nlist"] == 25
    assert result["faiss_ivf"]["by_nprobe"]["31"]["recall@20"] == 1.0  # nprobe >= nlist: exhaustive
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
