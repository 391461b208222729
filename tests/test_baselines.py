"""denselm.baselines: BM25 scores worked out by hand, metrics on a hand-made run, a mock encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("bm25s")

from denselm.baselines import bm25_run, st_run, top_k_run  # noqa: E402

CORPUS_IDS = ["d1", "d2", "d3", "d4"]
CORPUS = [
    "python lists sort python",  # 4 words after tokenising, 'python' twice
    "sorting dictionaries keys",
    "python decorators wrap functions",
    "threads locks",
]


def lucene_bm25(tf: int, df: int, n_docs: int, dl: int, avgdl: float, k1=1.5, b=0.75) -> float:
    """Lucene's BM25 (no (k1 + 1) factor in the numerator since Lucene 8, as in bm25s)."""
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))


def test_bm25_scores_match_the_formula():
    run = bm25_run(CORPUS_IDS, CORPUS, ["q"], ["python"], k=10)
    avgdl = (4 + 3 + 4 + 2) / 4
    expected_d1 = lucene_bm25(tf=2, df=2, n_docs=4, dl=4, avgdl=avgdl)
    expected_d3 = lucene_bm25(tf=1, df=2, n_docs=4, dl=4, avgdl=avgdl)
    assert set(run["q"]) == {"d1", "d3"}  # documents without the word score 0 and are left out
    assert run["q"]["d1"] == pytest.approx(expected_d1, rel=1e-5)
    assert run["q"]["d3"] == pytest.approx(expected_d3, rel=1e-5)


def test_bm25_stopwords_k_and_stemmer():
    run = bm25_run(CORPUS_IDS, CORPUS, ["stop", "two", "lock"], ["the of and", "python threads", "lock"], k=1)
    assert run["stop"] == {}  # only stopwords: nothing retrieved
    assert len(run["two"]) == 1
    assert run["lock"] == {}  # 'lock' != 'locks' without stemming
    strip_s = lambda words: [w[:-1] if w.endswith("s") else w for w in words]  # noqa: E731
    run = bm25_run(CORPUS_IDS, CORPUS, ["lock"], ["lock"], k=10, stemmer=strip_s)
    assert list(run["lock"]) == ["d4"]
    with pytest.raises(ValueError, match="same lengths"):
        bm25_run(CORPUS_IDS, CORPUS[:2], ["q"], ["x"])


def test_top_k_run():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    run = top_k_run(scores, ["a", "b", "c"], ["q1", "q2"], k=2)
    assert run == {"q1": {"b": 0.9, "c": 0.5}, "q2": {"a": 0.7, "c": 0.3}}


class MockEncoder:
    """Embeds a text as the unit vector of its counts of 'x', 'y', 'z' (what st_run calls)."""

    def __init__(self):
        self.prompts = []

    def encode(self, texts, batch_size=32, prompt=None, normalize_embeddings=True, **_):
        self.prompts.append(prompt)
        v = np.array([[t.count("x"), t.count("y"), t.count("z")] for t in texts], dtype=np.float32) + 1e-6
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_st_run_with_mock_encoder():
    enc = MockEncoder()
    run = st_run(enc, ["dx", "dy", "dz"], ["xx", "yy", "zz"], ["q"], ["x y"], k=3, query_prompt="P: ")
    ranked = sorted(run["q"], key=lambda d: -run["q"][d])
    assert ranked[:2] in (["dx", "dy"], ["dy", "dx"]) and ranked[2] == "dz"
    assert run["q"]["dx"] == pytest.approx(1 / math.sqrt(2), abs=1e-4)
    assert run["q"]["dz"] == pytest.approx(0.0, abs=1e-4)
    assert enc.prompts == [None, "P: "]  # documents without, queries with the prompt


@pytest.mark.slow  # a real asset
def test_st_run_real_minilm():
    from denselm.assets import AssetMissing, minilm_dir

    try:
        folder = minilm_dir()
    except AssetMissing as err:
        pytest.skip(str(err))
    docs = [
        "To sort a list in place, call its sort() method; sorted() returns a new list.",
        "A thread lock ensures that only one thread runs a critical section at a time.",
        "The json module encodes and decodes JSON data.",
    ]
    run = st_run(folder, ["sort", "lock", "json"], docs, ["q1", "q2"], ["How do I sort a list?", "How do I parse JSON?"], k=3)
    assert max(run["q1"], key=run["q1"].get) == "sort"
    assert max(run["q2"], key=run["q2"].get) == "json"
