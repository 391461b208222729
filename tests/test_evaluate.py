"""Metrics: by hand on the tiny fixture, cross-checked against pytrec_eval / ir_measures, and the CLI."""

import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from denselm.beir import load_beir
from denselm.cli import main as cli_main
from denselm.evaluate import (
    evaluate_embeddings,
    evaluate_model,
    evaluate_run,
    format_table,
    per_query_metrics,
    query_metrics,
    rank_documents,
)

FIXTURE = Path(__file__).parent / "fixtures" / "beir_tiny"
KS = (1, 3, 10)
L3 = math.log2(3)

# Worked out by hand from tests/fixtures/beir_tiny/README.md (bag-of-words scores, trec_eval ties).
EXPECTED_PER_QUERY = {
    # ranking d2 d1 | d6 d5 d4 d3; grades d2=2, d1=1: ideal order
    "q1": {"ndcg@1": 1.0, "ndcg@3": 1.0, "ndcg@10": 1.0, "mrr@1": 1.0, "mrr@3": 1.0, "mrr@10": 1.0,
           "recall@1": 0.5, "recall@3": 1.0, "recall@10": 1.0, "map": 1.0},
    # ranking d3 d1 | ...; gains 1 then 2, ideal 2 then 1
    "q2": {"ndcg@1": 0.5, "ndcg@3": (1 + 2 / L3) / (2 + 1 / L3), "ndcg@10": (1 + 2 / L3) / (2 + 1 / L3),
           "mrr@1": 1.0, "mrr@3": 1.0, "mrr@10": 1.0, "recall@1": 0.5, "recall@3": 1.0, "recall@10": 1.0,
           "map": 1.0},
    # d2, d3, d4 tie at 1: trec_eval ranks d4, d3, d2, so the relevant d2 is 3rd
    "q3": {"ndcg@1": 0.0, "ndcg@3": 0.5, "ndcg@10": 0.5, "mrr@1": 0.0, "mrr@3": 1 / 3, "mrr@10": 1 / 3,
           "recall@1": 0.0, "recall@3": 1.0, "recall@10": 1.0, "map": 1 / 3},
    # judged, nothing relevant
    "q4": dict.fromkeys(["ndcg@1", "ndcg@3", "ndcg@10", "mrr@1", "mrr@3", "mrr@10",
                         "recall@1", "recall@3", "recall@10", "map"], 0.0),
}
EXPECTED_MEAN = {m: sum(q[m] for q in EXPECTED_PER_QUERY.values()) / 4 for m in EXPECTED_PER_QUERY["q1"]}


class BagOfWords:
    """Fake encoder: one dimension per vocabulary word, value = count in the text."""

    def __init__(self, vocab=("apple", "banana", "cherry", "date", "elder", "fig", "fruit")):
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.calls = []

    def _encode(self, texts):
        out = np.zeros((len(texts), len(self.vocab)), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[row, self.vocab[word]] += 1
        return out

    def encode_queries(self, texts, instruction=None, batch_size=8):
        self.calls.append(("queries", len(texts), instruction, batch_size))
        return self._encode(texts)

    def encode_corpus(self, texts, batch_size=8):
        self.calls.append(("corpus", len(texts), batch_size))
        return self._encode(texts)


def assert_metrics(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], abs=1e-12), name


def test_rank_documents_uses_trec_eval_tie_rule():
    assert rank_documents({"a": 1.0, "c": 1.0, "z": 1.0, "b": 0.5, "y": 2.0}) == ["y", "z", "c", "a", "b"]


def test_hand_worked_fixture():
    data = load_beir(FIXTURE)
    enc = BagOfWords()
    # depth 6 = the whole corpus, so the zero-score tail is ranked as well
    metrics = evaluate_model(enc.encode_queries, enc.encode_corpus, data, KS, depth=6)
    assert_metrics(metrics, EXPECTED_MEAN)
    assert EXPECTED_MEAN["ndcg@10"] == pytest.approx((1 + 0.8597186998521972 + 0.5) / 4)

    emb_q, emb_d = enc._encode(data.query_texts), enc._encode(data.corpus_texts)
    run = {qid: {did: float(s) for did, s in zip(data.corpus_ids, emb_d @ q)} for qid, q in zip(data.query_ids, emb_q)}
    per_query = per_query_metrics(run, data.qrels, KS)
    for qid, expected in EXPECTED_PER_QUERY.items():
        assert_metrics(per_query[qid], expected)
    assert_metrics(evaluate_embeddings(data.query_ids, emb_q, data.corpus_ids, emb_d, data.qrels, KS, depth=6),
                   EXPECTED_MEAN)


def test_query_missing_from_run_scores_zero_and_counts():
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}}
    metrics = evaluate_run({"a": {"d1": 1.0}, "extra": {"d1": 1.0}}, qrels, ks=(1,))
    assert metrics == {"ndcg@1": 0.5, "mrr@1": 0.5, "recall@1": 0.5, "map": 0.5}


def test_negative_grades_are_gain_zero():
    # trec_eval: grade -1 is not relevant and adds no gain (pytrec_eval gives 0.6199...)
    m = query_metrics(["a", "b", "c"], {"a": -1, "b": 1, "c": 2}, ks=(10,))
    assert m["ndcg@10"] == pytest.approx((1 / L3 + 2 / 2) / (2 + 1 / L3))
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def random_run_and_qrels(seed):
    """40 judged queries over 300 docs; scores rounded to one decimal so ties are common."""
    rng = np.random.default_rng(seed)
    docs = [f"doc{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.choice(300, size=rng.integers(1, 25), replace=False)
        qrels[f"q{q}"] = {docs[i]: int(rng.integers(-1, 4)) for i in judged}  # grades -1..3, some all <= 0
        if q % 13 == 5:
            continue  # a few judged queries never retrieved
        retrieved = rng.choice(300, size=rng.integers(1, 150), replace=False)
        run[f"q{q}"] = {docs[i]: float(np.round(rng.random(), 1)) for i in retrieved}
    run["unjudged"] = {"doc1": 1.0}
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pytrec_eval_on_random_run(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run, qrels = random_run_and_qrels(seed)
    ks = (1, 5, 10, 100)
    measures = {"map", "recip_rank"} | {f"ndcg_cut_{k}" for k in ks} | {f"recall_{k}" for k in ks}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours = per_query_metrics(run, qrels, ks)
    assert any(not any(g > 0 for g in j.values()) for j in qrels.values())  # the random data has such queries
    for qid, m in ours.items():
        t = theirs.get(qid)
        if t is None:  # pytrec_eval leaves out judged queries missing from the run; we score them 0
            assert qid not in run and all(v == 0.0 for v in m.values())
            continue
        assert m["map"] == pytest.approx(t["map"], abs=1e-6)
        for k in ks:
            assert m[f"ndcg@{k}"] == pytest.approx(t[f"ndcg_cut_{k}"], abs=1e-6), (qid, k)
            assert m[f"recall@{k}"] == pytest.approx(t[f"recall_{k}"], abs=1e-6), (qid, k)
            # trec_eval's recip_rank is uncut: RR@k is it when the first relevant rank 1/RR is <= k
            rr = t["recip_rank"]
            expected_rr = rr if rr > 0 and round(1 / rr) <= k else 0.0
            assert m[f"mrr@{k}"] == pytest.approx(expected_rr, abs=1e-6), (qid, k)


def test_mean_matches_ir_measures():
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import AP, R, nDCG

    run, qrels = random_run_and_qrels(2)
    theirs = ir_measures.pytrec_eval.calc_aggregate([nDCG @ 10, R @ 10, AP, nDCG @ 1], qrels, run)
    ours = evaluate_run(run, qrels, ks=(1, 10))
    # ir_measures averages over every qrels query, missing ones counting 0: the same rule as ours
    assert ours["ndcg@10"] == pytest.approx(theirs[nDCG @ 10], abs=1e-6)
    assert ours["ndcg@1"] == pytest.approx(theirs[nDCG @ 1], abs=1e-6)
    assert ours["recall@10"] == pytest.approx(theirs[R @ 10], abs=1e-6)
    assert ours["map"] == pytest.approx(theirs[AP], abs=1e-6)


def test_format_table():
    table = format_table({"bm25": {"ndcg@10": 0.5, "map": 0.25}, "ours": {"ndcg@10": 0.61234}})
    assert table.splitlines() == [
        "metric   bm25    ours",
        "ndcg@10  0.5000  0.6123",
        "map      0.2500  -",
    ]


def test_evaluate_embeddings_ignore_identical_ids():
    # query "a" is also document "a" (identical vector); dropping it promotes the next hit
    doc_ids = ["a", "b", "c"]
    docs = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    qrels = {"a": {"b": 1}}
    q = docs[:1]
    assert evaluate_embeddings(["a"], q, doc_ids, docs, qrels, ks=(1,))["mrr@1"] == 0.0
    assert evaluate_embeddings(["a"], q, doc_ids, docs, qrels, ks=(1,), ignore_identical_ids=True)["mrr@1"] == 1.0


@pytest.fixture
def fake_inference(monkeypatch):
    """Install a fake denselm.inference whose load_encoder returns a BagOfWords."""
    encoders = []

    def load_encoder(model_dir, device=None, preset=None):
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"{model_dir}: no model folder")
        encoders.append(BagOfWords())
        return encoders[-1]

    module = types.ModuleType("denselm.inference")
    module.load_encoder = load_encoder
    monkeypatch.setitem(sys.modules, "denselm.inference", module)
    return encoders


def test_evaluate_cli_with_fake_encoder(tmp_path, fake_inference, capsys):
    out, run_out = tmp_path / "metrics.json", tmp_path / "run.trec"
    argv = ["evaluate", "--model", str(tmp_path), "--data", str(FIXTURE), "--k", "1", "3", "10",
            "--query-instruction", "Find the fruit", "--batch-size", "4", "--output", str(out),
            "--per-query", "--run-output", str(run_out)]
    assert cli_main(argv) == 0
    enc = fake_inference[0]
    assert enc.calls == [("corpus", 6, 4), ("queries", 4, "Find the fruit", 4)]  # q5 (no qrels) not encoded
    payload = json.loads(out.read_text())
    assert_metrics(payload["metrics"], EXPECTED_MEAN)
    for qid, expected in EXPECTED_PER_QUERY.items():
        assert_metrics(payload["per_query"][qid], expected)
    assert payload["num_queries"] == 4 and payload["num_docs"] == 6 and payload["split"] == "test"
    assert payload["data_stats"]["num_queries_without_qrels"] == 1
    printed = capsys.readouterr().out
    assert re.search(r"ndcg@10\s+" + f"{EXPECTED_MEAN['ndcg@10']:.4f}", printed)
    assert run_out.read_text().splitlines()[12:15] == [  # q3's tie in trec_eval order
        "q3 Q0 d4 1 1 denselm", "q3 Q0 d3 2 1 denselm", "q3 Q0 d2 3 1 denselm"]


def test_evaluate_cli_bad_input(tmp_path, fake_inference, capsys):
    base = ["evaluate", "--model", str(tmp_path), "--output", str(tmp_path / "m.json")]
    assert cli_main(base + ["--data", str(FIXTURE), "--split", "dev"]) == 2
    assert "available splits: ['test']" in capsys.readouterr().err
    assert cli_main(base + ["--data", str(FIXTURE), "--k", "10", "--depth", "5"]) == 2
    assert "--depth 5 is smaller than the largest --k 10" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(FIXTURE)]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists() and fake_inference == []
