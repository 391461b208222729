"""`denselm doctor`: planted duplicates, leakage, positive-as-negative, siblings, truncation, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_helpers import WORDS, make_tokenizer, write_jsonl

from denselm.cli import main as cli_main
from denselm.doctor import (MinHasher, Settings, check_dataset, build_eval_index, doctor, jaccard, lsh_bands,
                            shingles)


def passage(seed: int, n: int = 100) -> list[str]:
    """n distinct-looking words (w0..w999 drawn without replacement): no repeated 5-shingle."""
    rng = np.random.default_rng(seed)
    return [f"w{i}" for i in rng.choice(1000, size=n, replace=False)]


def filler(n: int, start: int = 0) -> list[dict]:
    return [{"query": f"filler question {i}", "pos": [" ".join(passage(1000 + i, 30))], "neg": [f"other {i}"]}
            for i in range(start, start + n)]


def test_minhash_estimates_jaccard_and_lsh_bands():
    a = shingles(" ".join(passage(0)))
    assert len(a) == 96  # 100 words, 5-shingles
    b_words = passage(0)
    b_words[50] = "edited"
    b = shingles(" ".join(b_words))
    assert jaccard(a, b) == pytest.approx(91 / 101)  # one word in the middle changes 5 shingles
    assert len(shingles("Hello, world!")) == 1 and (shingles("hello world") == shingles("HELLO  world.")).all()
    sets = [a, b, shingles(" ".join(passage(1)))]
    sig = MinHasher(256).signatures(np.concatenate(sets), np.cumsum([0] + [len(x) for x in sets]))
    assert abs((sig[0] == sig[1]).mean() - 91 / 101) < 0.08 and (sig[0] == sig[2]).mean() < 0.05
    bands, rows = lsh_bands(0.9, 128)
    assert bands * rows <= 128 and 1 - (1 - 0.9**rows) ** bands >= 0.995
    assert 1 - (1 - 0.5**rows) ** bands < 0.05  # unrelated pairs rarely become candidates


def test_exact_and_near_duplicates_found(tmp_path):
    words = passage(7)
    mid, end, two = list(words), list(words), list(words)
    mid[50] = "changed"  # Jaccard 95/105 with the query's shingles
    end[99] = "changed"
    two[20], two[80] = "changed", "altered"  # two edits far apart: 90/110 = 0.82, not a near duplicate
    q = "what does the long passage say"
    lines = [
        {"query": q, "pos": [" ".join(words)], "neg": ["n0"]},  # line 1
        *filler(10),  # lines 2-11
        {"query": q, "pos": [" ".join(words)], "neg": ["n1"]},  # line 12: exact duplicate (negatives differ)
        {"query": q.upper() + "?", "pos": [" ".join(words)], "neg": ["n2"]},  # line 13: exact after normalising
        {"query": q, "pos": [" ".join(mid)], "neg": ["n3"]},  # line 14: one-word edit in the middle
        {"query": q, "pos": [" ".join(end)], "neg": ["n4"]},  # line 15: one-word edit at the end
        {"query": q, "pos": [" ".join(two)], "neg": ["n5"]},  # line 16: two edits
    ]
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    r = check_dataset(str(src), Settings())
    assert r["examples"] == 16
    assert r["duplicates"]["exact"] == 2 and r["duplicates"]["exact_examples"][0] == [1, 12]
    assert r["duplicates"]["near"] == 2
    near_lines = {tuple(p[:2]) for p in r["duplicates"]["near_examples"]}
    assert near_lines <= {(1, 14), (1, 15), (14, 15)} and len(near_lines) >= 2
    assert all(p[2] >= 0.9 for p in r["duplicates"]["near_examples"])
    assert {p["check"] for p in r["problems"]} == {"duplicates"}
    assert all(p["severity"] == "warning" for p in r["problems"])
    # at threshold 0.8 the two-edit line joins the cluster
    assert check_dataset(str(src), Settings(threshold=0.8))["duplicates"]["near"] == 3


def write_beir(folder, queries, corpus, qrels):
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "queries.jsonl", [{"_id": k, "text": v} for k, v in queries.items()])
    write_jsonl(folder / "corpus.jsonl", [{"_id": k, "title": "", "text": v} for k, v in corpus.items()])
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return folder


MENTIONED = "Why does a_tuple[i] += ['item'] raise an exception when the addition works?"
QUOTING = f"In certain situations augmented assignment can fail (see {MENTIONED}), as the data model says."


def leak_fixture(tmp_path):
    d1, d2, d3 = (" ".join(passage(s, 60)) for s in (21, 22, 23))
    beir = write_beir(tmp_path / "eval", {"q1": "How do I reverse a list in Python?", "q2": "What is a dict",
                                          "q3": "why is the sky blue", "q4": MENTIONED},
                      {"d1": d1, "d2": d2, "d3": d3, "d4": "unjudged"},
                      [("q1", "d1", 1), ("q2", "d2", 2), ("q3", "d3", 0), ("q4", "d3", 0)])
    d2_edit = d2.split()
    d2_edit[-1] = "edited"  # one shingle of 56 changes: Jaccard 55/57 (an edit in the middle: 51/61, "contained")
    lines = [
        {"query": "how do I REVERSE a list in python", "pos": ["use reversed"], "neg": ["x"]},  # line 1: exact query
        {"query": "dict question", "pos": [" ".join(d2_edit)], "neg": ["y"]},  # line 2: near passage
        {"query": "long section", "pos": ["intro words here " + d1 + " and more words after it"], "neg": ["z"]},  # 3
        {"query": "sky", "pos": ["clean"], "neg": [d3]},  # line 4: d3 is judged 0: not a relevant passage
        {"query": "clean", "pos": ["clean answer"], "neg": ["use reversed"]},  # line 5: sibling, no leak
        {"query": "augmented assignment", "pos": ["x += y"], "neg": [QUOTING]},  # line 6: quotes eval query q4
    ]
    return beir, write_jsonl(tmp_path / "train.jsonl", lines)


def test_leakage_found(tmp_path):
    beir, src = leak_fixture(tmp_path)
    index = build_eval_index(beir)
    assert sorted(index.kinds) == ["passage", "passage", "query", "query", "query", "query"]  # d3 is not relevant
    r = check_dataset(str(src), Settings(), index)
    leak = r["leakage"]
    assert (leak["exact"], leak["near"], leak["contained"], leak["query_mentions"]) == (1, 1, 2, 1)
    assert leak["by_kind"] == {"query->query": 1, "pos->passage": 2, "neg->query": 1}
    got = {(e["line"], e["field"], e["eval_id"], e["match"]) for e in leak["examples"]}
    assert got == {(1, "query", "q1", "exact"), (2, "pos", "d2", "near"), (3, "pos", "d1", "contained"),
                   (6, "neg", "q4", "contained")}
    near = next(e for e in leak["examples"] if e["match"] == "near")
    assert near["jaccard"] == pytest.approx(55 / 57, abs=1e-4)
    assert [p["check"] for p in r["problems"] if p["severity"] == "hard"] == ["leakage"]
    # at 0.99 the edited passage (55/57, 55/56 of d2 inside) passes; d1 wholly inside a section does not
    strict = check_dataset(str(src), Settings(threshold=0.99), index)["leakage"]
    assert (strict["exact"], strict["near"], strict["contained"]) == (1, 0, 2)
    # a passage quoting an eval question (a docs cross-reference) alone is a warning, not a hard problem
    quoting = write_jsonl(tmp_path / "quoting.jsonl", [leak_lines_only_quote()])
    q = check_dataset(str(quoting), Settings(), index)
    assert q["leakage"]["query_mentions"] == 1
    assert [(p["severity"], p["check"]) for p in q["problems"]] == [("warning", "leakage")]


def leak_lines_only_quote():
    return {"query": "augmented assignment", "pos": ["x += y"], "neg": [QUOTING]}


def test_positive_as_negative_and_siblings(tmp_path):
    lines = [
        {"query": "alpha", "pos": ["A text"], "neg": ["B text", "a TEXT."]},  # line 1: its positive as negative
        {"query": "beta", "pos": ["B text"], "neg": ["C text", "A text"]},  # line 2: A is line 1's positive
        {"query": "alpha", "pos": ["C text"], "neg": ["A text"]},  # line 3: A is the positive of the same query
        {"query": "gamma", "pos": ["D text"], "neg": ["E text"]},  # line 4: clean
    ]
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    r = check_dataset(str(src), Settings())
    assert r["positive_as_negative"] == {"negatives": 1, "lines": 1, "examples": [1]}
    sib = r["sibling_positives"]
    # line 1: B (line 2's positive); line 2: C (line 3's), A (line 1's); line 3: A (line 1's, same query)
    assert sib["negatives"] == 4 and sib["lines"] == 3 and sib["examples"] == [1, 2, 3]
    assert sib["same_query"] == 1 and sib["fraction_of_negatives"] == pytest.approx(4 / 6)
    checks = {(p["severity"], p["check"]) for p in r["problems"]}
    assert checks == {("hard", "positive_as_negative"), ("warning", "sibling_positives")}


def test_truncation_matches_the_collator(tmp_path):
    from denselm.data.config import DataConfig
    from denselm.data.templates import fit_queries
    from denselm.data.tokenize import tokenize_with_eos

    rng = np.random.default_rng(0)
    lines = [{"query": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))),
              "pos": [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 30))))],
              "neg": [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))) for _ in range(2)]}
             for _ in range(40)]
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    tok = make_tokenizer()
    cfg = DataConfig(template="e5-mistral", prompt="Given a query", query_max_len=24, passage_max_len=20)
    r = check_dataset(str(src), Settings(), tokenizer=tok, data_cfg=cfg)
    tr = r["truncation"]
    _, q_cut = fit_queries(tok, "e5-mistral", ["Given a query"] * 40, [l["query"] for l in lines], 24)
    passages = list(dict.fromkeys(p for l in lines for p in l["pos"] + l["neg"]))
    _, p_cut = tokenize_with_eos(tok, passages, 20, return_truncated=True)
    assert tr["sampled_examples"] == 40
    assert tr["queries"]["truncated"] == q_cut and tr["queries"]["count"] == 40
    assert tr["passages"]["truncated"] == p_cut and tr["passages"]["count"] == len(passages)
    assert 0 < q_cut < 40 and 0 < p_cut < len(passages)  # the fixture exercises both sides
    assert tr["queries"]["fraction"] == pytest.approx(q_cut / 40)

    # in-context examples: a budget below any demo drops every drawn one
    icl = DataConfig(template="bge-icl", prompt="Given a query", query_max_len=64, passage_max_len=20,
                     icl_max_examples=3, icl_token_budget=4)
    t = check_dataset(str(src), Settings(), tokenizer=tok, data_cfg=icl)["truncation"]["icl"]
    assert t["drawn"] > 0 and t["dropped"] == t["drawn"] and t["demos_over_budget_alone"] == 1.0
    roomy = DataConfig(template="bge-icl", prompt="Given a query", query_max_len=512, passage_max_len=20,
                       icl_max_examples=3, icl_token_budget=500)
    assert check_dataset(str(src), Settings(), tokenizer=tok, data_cfg=roomy)["truncation"]["icl"]["dropped"] == 0


def test_teacher_scores_and_model_false_negatives(tmp_path):
    lines = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}a", f"n{i}b"],
              "pos_scores": [0.50], "neg_scores": [0.49, 0.48]} for i in range(8)]
    src = write_jsonl(tmp_path / "train.jsonl", lines)
    ts = check_dataset(str(src), Settings())["teacher_scores"]
    assert ts["lines"] == 8 and ts["positive"]["p50"] == 0.5 and ts["negative"]["max"] == 0.49
    assert ts["near_uniform"] and ts["entropy_ratio_at_temperature"] > 0.99
    assert ts["lines_negative_above_positive"] == 0.0 and ts["positive_minus_best_negative"]["max"] == pytest.approx(0.01)
    sharp = check_dataset(str(src), Settings(), teacher_temperature=0.001)["teacher_scores"]
    assert not sharp["near_uniform"]
    flipped = write_jsonl(tmp_path / "flipped.jsonl", [dict(l, neg_scores=[0.6, 0.1]) for l in lines[:3]] + lines[3:])
    f = check_dataset(str(flipped), Settings(), teacher_temperature=0.001)
    assert f["teacher_scores"]["lines_negative_above_positive"] == 3 / 8
    assert [p["check"] for p in f["problems"]] == ["teacher_scores"]

    class Fake:
        """Unit vectors by hand: queries (1, 0); p* and *a at angle 0.1; *b at 0 (above the positive)."""

        def encode_corpus(self, texts):
            return np.array([[np.cos(0.0), np.sin(0.0)] if t.endswith("b") else [np.cos(0.1), np.sin(0.1)]
                             for t in texts], dtype=np.float32)

        def encode_queries(self, texts, instruction=None):
            return np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(texts), 1))

    fn = check_dataset(str(src), Settings(), encoder=Fake())["false_negatives"]
    # *a ties the positive (not above), *b scores above it: half of the negatives, every line
    assert fn == {"sampled_lines": 8, "negatives": 16, "above_positive": 8, "rate": 0.5, "lines_with_any": 8}


def test_cli_config_strict_and_json_schema(tmp_path, capsys):
    beir, src = leak_fixture(tmp_path)
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    clean = write_jsonl(tmp_path / "clean" / "clean.jsonl", filler(5))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {{name_or_path: {tok_dir}}}\n"
                   f"data: {{train_data: [{src}, {clean}], query_max_len: 16, passage_max_len: 300, template: none}}\n"
                   f"eval: {{data: {beir}}}\n")
    report_path = tmp_path / "report.json"
    assert cli_main(["doctor", str(cfg), "--json", str(report_path)]) == 0  # hard problems, but not --strict
    out = capsys.readouterr().out
    assert "HARD: leakage" in out and "2 dataset(s)" in out
    assert cli_main(["doctor", str(cfg), "--strict"]) == 1
    assert cli_main(["doctor", str(clean), "--eval", str(beir), "--strict"]) == 0
    # dotted overrides reach the config, as for `denselm train`
    assert cli_main(["doctor", str(cfg), "--data.passage_max_len", "8", "--json", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["settings"]["passage_max_len"] == 8

    report = json.loads(report_path.read_text())
    assert set(report) == {"version", "settings", "notes", "datasets", "hard_problems", "warnings", "seconds"}
    assert report["version"] == 1 and report["hard_problems"] == 1 and report["settings"]["threshold"] == 0.9
    assert report["settings"]["eval"] == str(beir) and report["settings"]["query_max_len"] == 16
    ds = {d["path"]: d for d in report["datasets"]}
    assert set(ds) == {str(src), str(clean)}
    for d in ds.values():
        assert set(d) == {"path", "examples", "type", "duplicates", "positive_as_negative", "sibling_positives",
                          "leakage", "truncation", "teacher_scores", "false_negatives", "problems", "seconds"}
        assert set(d["duplicates"]) == {"exact", "near", "exact_examples", "near_examples", "lsh"}
        assert set(d["leakage"]) == {"eval", "texts_checked", "exact", "near", "contained", "query_mentions",
                                     "by_kind", "examples"}
        assert set(d["truncation"]) == {"sampled_examples", "queries", "passages"}
        assert set(d["truncation"]["queries"]) == {"count", "max_len", "truncated", "fraction", "tokens"}
        assert d["teacher_scores"] is None and d["false_negatives"] is None
        for p in d["problems"]:
            assert set(p) == {"severity", "check", "message"} and p["severity"] in ("hard", "warning")
    assert ds[str(clean)]["problems"] == [] and ds[str(clean)]["leakage"]["texts_checked"] == 15


def test_doctor_bad_input(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "x", "pos": []}])
    assert cli_main(["doctor", str(bad)]) == 2
    assert f"{bad}:1: field 'pos': empty list" in capsys.readouterr().err
    assert cli_main(["doctor", str(tmp_path / "missing.jsonl")]) == 2
    good = write_jsonl(tmp_path / "good.jsonl", filler(2))
    assert cli_main(["doctor", str(good), "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="corpus.jsonl not found"):
        doctor([str(good)], eval_folder=str(tmp_path / "no-beir"))


def test_doctor_bench_smoke():
    """The benchmark runs end to end at a tiny size and finds what it plants."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "doctor_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--examples", "400"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {r["stage"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(stages) == {"generate", "doctor", "extrapolate"}
    doc = stages["doctor"]
    assert doc["examples_per_cpu_s"] > 0 and doc["leaks"]["exact"] == 10  # 5 queries + 5 passages planted
    assert doc["exact_duplicates"] > 0 and doc["near_duplicates"] > 0
