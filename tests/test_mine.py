"""`denselm mine`: the selection rule by hand, BM25 and model mining cross-checked, counts, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_helpers import write_jsonl
from test_encode import save_tiny_denselm

from denselm.cli import main as cli_main
from denselm.mine import parse_range, select_negatives


def test_select_negatives_by_hand():
    pool = [f"p{i}" for i in range(10)]
    ranked = [3, 1, 4, 0, 5, 9, 2, 6]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    rng = np.random.default_rng(0)
    # slice [1, 6) -> p1 p4 p0 p5 p9; p4 is a positive; 0.8 > threshold 0.75 drops p1
    negs, counts = select_negatives(ranked, scores, pool, {"p4"}, 1, 6, 10, rng, threshold=0.75)
    assert negs == ["p0", "p5", "p9"]
    assert counts == {"excluded": 1, "false_negatives": 1, "candidates": 3}
    # sampling: a subset in rank order, a pure function of the generator's seed
    a, _ = select_negatives(ranked, scores, pool, set(), 0, 8, 3, np.random.default_rng([7, 1]))
    b, _ = select_negatives(ranked, scores, pool, set(), 0, 8, 3, np.random.default_rng([7, 1]))
    assert a == b and len(a) == 3 and a == [p for p in [pool[i] for i in ranked] if p in a]
    draws = {tuple(select_negatives(ranked, scores, pool, set(), 0, 8, 3, np.random.default_rng([s, 1]))[0])
             for s in range(20)}
    assert len(draws) > 5
    assert parse_range("10-100") == (10, 100)
    for bad in ("10", "a-b", "5-5", "-1-3"):
        with pytest.raises(ValueError, match="--range"):
            parse_range(bad)


def fruit_lines():
    return [
        {"query": "apple banana cherry", "pos": ["apple banana cherry grape"], "neg": ["x"],
         "prompt": "Find fruit", "type": "normal", "pos_scores": [1.0], "neg_scores": [0.1]},
        {"query": "lemon mango", "pos": ["lemon mango orange"], "neg": ["apple banana cherry"]},
        {"query": "pear plum", "pos": ["pear plum"], "neg": ["lemon tea", "plum wine", "pear cake"]},
        {"query": "the of and", "pos": ["lemon"], "neg": ["apple pie"]},  # stopwords only: no BM25 candidate
    ]


def test_bm25_mining(tmp_path):
    pytest.importorskip("bm25s")  # in the demo extra, not the test extra
    from denselm.baselines import bm25_run
    from denselm.mine import pool_from_lines

    lines = fruit_lines()
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "mined.jsonl"
    assert cli_main(["mine", "--model", "bm25", "--input", str(src), "--output", str(out),
                     "--range", "0-100", "--num-negatives", "50"]) == 0
    mined = [json.loads(l) for l in out.read_text().splitlines()]
    # cross-check with denselm.baselines.bm25_run over the same pool: every document with a
    # positive score, minus the line's positives and the query itself
    pool = pool_from_lines([(i, o) for i, o in enumerate(lines)])
    run = bm25_run([str(i) for i in range(len(pool))], pool, ["q0", "q1", "q2"], [l["query"] for l in lines[:3]])
    for i in range(3):
        expected = {pool[int(d)] for d in run[f"q{i}"]} - set(lines[i]["pos"]) - {lines[i]["query"]}
        assert set(mined[i]["neg"]) == expected, i
    assert mined[0]["neg"] == ["apple pie"]  # its positive and its own query text were the others
    # fields: prompt/type kept, stale teacher scores removed; line 3 had no candidate and kept its negatives
    assert mined[0]["prompt"] == "Find fruit" and mined[0]["type"] == "normal"
    assert "pos_scores" not in mined[0] and "neg_scores" not in mined[0]
    assert mined[3]["neg"] == ["apple pie"]
    stats = json.loads((tmp_path / "mined.jsonl.stats.json").read_text())
    assert stats["lines"] == 4 and stats["no_candidates"] == 1 and stats["teacher_scores_removed"] == 1
    assert stats["mined"] == 3 and stats["too_few_candidates"] == 3
    # excluded: line 0's positive and query text, line 1's positive, line 2's positive (== its query)
    assert stats["positives_in_range"] == 4

    # false negatives: "apple banana cherry" is the query itself; a near-copy of the positive that
    # scores above 0.95 x the positive's BM25 score is dropped
    lines2 = [dict(lines[0], neg=["apple banana cherry pie", "grape"]), lines[1], lines[2]]
    lines2[0].pop("pos_scores"), lines2[0].pop("neg_scores")
    lines2[1] = dict(lines[1], neg=["apple banana cherries"])
    src2 = write_jsonl(tmp_path / "train2.jsonl", lines2)
    plain, filtered = tmp_path / "plain.jsonl", tmp_path / "filtered.jsonl"
    common = ["--model", "bm25", "--input", str(src2), "--range", "0-10", "--num-negatives", "10"]
    assert cli_main(["mine", *common, "--output", str(plain)]) == 0
    assert cli_main(["mine", *common, "--output", str(filtered), "--max-positive-ratio", "0.95"]) == 0
    p0 = json.loads(plain.read_text().splitlines()[0])["neg"]
    f0 = json.loads(filtered.read_text().splitlines()[0])["neg"]
    # "... pie" has the positive's length and matched terms: the positive's score, above 0.95 x;
    # "... cherries" matches two of three terms (no stemming): kept. "grape" scores 0: never a candidate.
    assert set(p0) == {"apple banana cherry pie", "apple banana cherries"}
    assert f0 == ["apple banana cherries"]
    fstats = json.loads((tmp_path / "filtered.jsonl.stats.json").read_text())
    assert fstats["false_negatives_dropped"] == 1 + _dropped_elsewhere(plain, filtered)
    assert fstats["lines_without_positive_score"] == 0


def _dropped_elsewhere(plain, filtered) -> int:
    a = [set(json.loads(l)["neg"]) for l in plain.read_text().splitlines()[1:]]
    b = [set(json.loads(l)["neg"]) for l in filtered.read_text().splitlines()[1:]]
    return sum(len(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_denselm(tmp_path_factory.mktemp("mine") / "model", template="e5-mistral")


def test_model_mining_matches_exact_scores(tmp_path, model_dir):
    from denselm.inference import load_encoder

    words = "apple banana cherry grape lemon mango orange pear plum python list dict".split()
    pool = [" ".join(words[i : i + 3]) for i in range(len(words) - 2)] + ["the answer", "a value"]  # 12 texts
    lines = [{"query": f"{words[i]} {words[i + 1]}", "pos": [pool[i]], "neg": pool[(i + 5) % 12 : (i + 5) % 12 + 1]}
             for i in range(6)]
    lines[2]["prompt"] = "Retrieve a fruit list"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"c{i}", "text": t} for i, t in enumerate(pool)])
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "mined.jsonl"
    base = ["mine", "--dtype", "float32", "--model", str(model_dir), "--input", str(src), "--corpus", str(corpus), "--device", "cpu",
            "--range", "2-9", "--instruction", "Find related fruit"]
    assert cli_main([*base, "--output", str(out), "--num-negatives", "20", "--max-positive-ratio", "1.0"]) == 0
    mined = [json.loads(l) for l in out.read_text().splitlines()]

    enc = load_encoder(model_dir, device="cpu", show_progress=False)
    d = enc.encode_corpus(pool)
    stats = json.loads((tmp_path / "mined.jsonl.stats.json").read_text())
    dropped = 0
    for line, new in zip(lines, mined):
        q = enc.encode_queries([line["query"]], instruction=line.get("prompt", "Find related fruit"))[0]
        s = d @ q  # (12,)
        order = sorted(range(len(pool)), key=lambda j: (-s[j], j))[2:9]
        pos_score = float(enc.encode_corpus(line["pos"])[0] @ q)
        keep = [pool[j] for j in order if pool[j] not in line["pos"] and s[j] <= 1.0 * pos_score + 1e-6]
        dropped += sum(pool[j] not in line["pos"] and s[j] > 1.0 * pos_score + 1e-6 for j in order)
        if keep:
            assert new["neg"] == keep, line["query"]
        else:
            assert new["neg"] == line["neg"]
    assert stats["false_negatives_dropped"] == dropped

    # sampling is deterministic under --seed and depends on it
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    assert cli_main([*base, "--output", str(a), "--num-negatives", "2", "--seed", "1"]) == 0
    assert cli_main([*base, "--output", str(b), "--num-negatives", "2", "--seed", "1"]) == 0
    assert cli_main([*base, "--output", str(c), "--num-negatives", "2", "--seed", "2"]) == 0
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    assert all(len(json.loads(l)["neg"]) == 2 for l in a.read_text().splitlines())


def test_mine_bad_input(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", [fruit_lines()[1], {"query": "x", "pos": []}])
    out = tmp_path / "o.jsonl"
    assert cli_main(["mine", "--model", "bm25", "--input", str(src), "--output", str(out)]) == 2
    assert f"{src}:2: field 'pos': empty list" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "g.jsonl", fruit_lines())
    assert cli_main(["mine", "--model", "bm25", "--input", str(good), "--output", str(out), "--range", "9-3"]) == 2
    assert "--range 9-3" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    assert cli_main(["mine", "--model", str(plain), "--input", str(good), "--output", str(out)]) == 2
    assert "preset" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ positive-aware rules (NV-Retriever TopK-PercPos)


def test_positive_aware_masks_by_hand():
    from denselm.mine import positive_aware_masks

    s = [0.99, 0.96, 0.94, 0.5]
    r, m = positive_aware_masks(s, 1.0, ratio=0.95)  # drop above 0.95
    assert r.tolist() == [True, True, False, False] and not m.any()
    r, m = positive_aware_masks(s, 1.0, margin=0.02)  # drop above 0.98
    assert not r.any() and m.tolist() == [True, False, False, False]
    r, m = positive_aware_masks(s, 1.0, ratio=0.95, margin=0.02)
    assert r.tolist() == [True, True, False, False] and m.tolist() == [True, False, False, False]
    # a positive <= 0: "95% of it" would rank above it, so the ratio rule is off; the margin still applies
    r, m = positive_aware_masks([-0.1, -0.7], -0.5, ratio=0.95, margin=0.1)  # margin: drop above -0.6
    assert not r.any() and m.tolist() == [True, False]
    r, m = positive_aware_masks(s, float("nan"), ratio=0.95, margin=0.1)
    assert not r.any() and not m.any()


def _ranked_lines():
    pool = ["a", "b", "c", "d", "e", "f"]
    lines = [(1, {"query": "q1", "pos": ["a"], "neg": ["f"], "pos_scores": [1.0], "neg_scores": [0.0]}),
             (2, {"query": "q2", "pos": ["f"], "neg": ["a"]})]
    # line 1 ranks a (its positive) b c d e; line 2 ranks b c d e f
    indices = np.array([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    scores = np.array([[1.0, 0.97, 0.93, 0.5, 0.1], [0.8, 0.6, 0.45, 0.2, 0.5]], dtype=np.float32)
    return pool, lines, indices, scores, np.array([1.0, 0.5])


def test_mine_lines_rules_counts_and_quantiles():
    from denselm.mine import mine_lines

    pool, lines, indices, scores, pos_min = _ranked_lines()
    out, stats = mine_lines(lines, pool, indices, scores, pos_min, 0, 5, 10, max_positive_ratio=0.95,
                            positive_margin=0.05)
    # line 1 (positive 1.0): ratio drops > 0.95 -> b; margin drops > 0.95 -> b. Kept c d e.
    # line 2 (positive 0.5): ratio drops > 0.475 -> b c; margin drops > 0.45 -> b c (0.45 is not above). Kept d e.
    assert out[0]["neg"] == ["c", "d", "e"] and out[1]["neg"] == ["d", "e"]
    assert stats.dropped_by_ratio == 3 and stats.dropped_by_margin == 3 and stats.false_negatives_dropped == 3
    assert stats.lines_with_false_negatives == 2 and stats.positives_in_range == 2  # a (line 1), f (line 2)
    kept = np.array([0.93, 0.5, 0.1, 0.45, 0.2], dtype=np.float32).astype(np.float64)
    q = stats.kept_score_quantiles
    assert q["count"] == 5 and q["min"] == pytest.approx(0.1) and q["max"] == pytest.approx(0.93)
    assert q["p50"] == pytest.approx(np.median(kept))
    assert stats.positive_score_quantiles["count"] == 2 and stats.positive_score_quantiles["min"] == 0.5
    assert "pos_scores" not in out[0] and stats.teacher_scores_removed == 1

    # the rules differ: a margin of 0.02 drops only above 0.98 / 0.48 -> nothing on line 1, b c on line 2
    out, stats = mine_lines(lines, pool, indices, scores, pos_min, 0, 5, 10, positive_margin=0.02)
    assert out[0]["neg"] == ["b", "c", "d", "e"] and out[1]["neg"] == ["d", "e"]
    assert stats.dropped_by_ratio == 0 and stats.dropped_by_margin == 2 and stats.false_negatives_dropped == 2

    # no positive score (BM25 pool without the positive): the line skips the rules, counted
    out, stats = mine_lines(lines, pool, indices, scores, np.array([np.nan, 0.5]), 0, 5, 10, max_positive_ratio=0.95)
    assert out[0]["neg"] == ["b", "c", "d", "e"] and stats.lines_without_positive_score == 1


def test_mine_lines_with_a_judge():
    from denselm.mine import mine_lines

    pool, lines, indices, scores, pos_min = _ranked_lines()
    # the teacher disagrees with the ranker: it thinks e is as good as line 1's positive, b is poor
    table = {("q1", "a"): 2.0, ("q1", "b"): 0.3, ("q1", "c"): 1.5, ("q1", "d"): 1.0, ("q1", "e"): 1.95,
             ("q2", "f"): 4.0, ("q2", "b"): 3.9, ("q2", "c"): 1.0, ("q2", "d"): 3.7, ("q2", "e"): 0.0}
    calls = []

    def judge(queries, texts):
        calls.append((list(queries), [list(t) for t in texts]))
        return [[table[q, t] for t in ts] for q, ts in zip(queries, texts)]

    out, stats = mine_lines(lines, pool, indices, scores, pos_min, 0, 5, 10, max_positive_ratio=0.95, judge=judge)
    # one call, positives first: line 1 [a, b, c, d, e], line 2 [f, b, c, d, e]
    assert calls == [(["q1", "q2"], [["a", "b", "c", "d", "e"], ["f", "b", "c", "d", "e"]])]
    # line 1: > 1.9 -> e; line 2: > 3.8 -> b
    assert out[0]["neg"] == ["b", "c", "d"] and out[1]["neg"] == ["c", "d", "e"]
    assert stats.judge == "teacher" and stats.dropped_by_ratio == 2
    assert stats.kept_score_quantiles["max"] == 3.7 and stats.positive_score_quantiles["min"] == 2.0


def test_mine_cli_teacher_judge_matches_score(tmp_path):
    """`--judge` with a tiny bi-encoder: the drops are exactly what `denselm score`'s scores imply."""
    pytest.importorskip("bm25s")
    from sentence_transformers import SentenceTransformer

    from test_score import tiny_bert_config, tiny_bert_tokenizer
    from denselm.score import bi_encoder_scores

    import torch
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import BertModel

    tok = tiny_bert_tokenizer()
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tok))).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    SentenceTransformer(modules=[Transformer(str(tmp_path / "bert")), Pooling(32, "mean"), Normalize()],
                        device="cpu").save(str(tmp_path / "bi"))

    lines = fruit_lines()[:3]
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "mined.jsonl"
    base = ["mine", "--model", "bm25", "--input", str(src), "--range", "0-100", "--num-negatives", "50",
            "--judge", str(tmp_path / "bi"), "--device", "cpu"]
    assert cli_main([*base, "--output", str(out), "--positive-margin", "0.06"]) == 0
    plain = tmp_path / "plain.jsonl"
    assert cli_main(["mine", "--model", "bm25", "--input", str(src), "--range", "0-100", "--num-negatives", "50",
                     "--output", str(plain)]) == 0
    before = [json.loads(l)["neg"] for l in plain.read_text().splitlines()]
    after = [json.loads(l)["neg"] for l in out.read_text().splitlines()]
    model = SentenceTransformer(str(tmp_path / "bi"), device="cpu")
    scores = bi_encoder_scores(model, [l["query"] for l in lines], [l["pos"] + b for l, b in zip(lines, before)])
    dropped = 0
    for line, b, a, s in zip(lines, before, after, scores):
        pos = min(s[: len(line["pos"])])
        expected = [t for t, x in zip(b, s[len(line["pos"]):]) if not x > pos - 0.06]
        dropped += len(b) - len(expected)
        assert a == (expected or line["neg"]), line["query"]
    stats = json.loads((tmp_path / "mined.jsonl.stats.json").read_text())
    assert stats["judge"] == "teacher" and stats["judge_model"] == str(tmp_path / "bi")
    assert dropped > 0 and stats["dropped_by_margin"] == dropped and stats["dropped_by_ratio"] == 0
    assert stats["kept_score_quantiles"]["count"] == sum(len(a) for a, l in zip(after, lines) if a != l["neg"])
