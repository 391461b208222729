"""scripts/build_wordnet_pairs.py: WordNet parsing, pair texts, dedup, leak check, reproducible output.

Runs on a fixture of real WordNet 3.0 lines (tests/fixtures/wordnet), without the teacher.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from data_helpers import ROOT, load_script

FIXTURE = ROOT / "tests" / "fixtures" / "wordnet"


w = load_script("build_wordnet_pairs")

DOG = (
    "a member of the genus Canis (probably descended from the common wolf) that has been domesticated by man "
    "since prehistoric times; occurs in many breeds"
)
SHED = "cast off hair, skin, horn, or feathers"


def _synsets():
    return {s.source: s for s in w.load_synsets(w.find_wordnet(FIXTURE))}


def _build(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    argv = ["--sources", str(FIXTURE), "--out", str(out), "--license", str(out / "LICENSE"), "--no-teacher",
            "--num-neg", "2", "--eval", *extra]
    assert w.main(argv) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- parsing ------------------------------------------------------------------------------------


def test_parse_skips_license_header_and_reads_every_synset():
    synsets = _synsets()
    assert len(synsets) == 8 + 3
    assert {s.pos for s in synsets.values()} == {"noun", "verb"}


def test_parse_lemmas_pos_definition_examples():
    s = _synsets()
    dog = s["data.noun:02084071"]
    assert dog.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert (dog.ss_type, dog.pos) == ("n", "noun")
    assert dog.definition == DOG
    assert dog.examples == ("the dog barked all night",)
    shed = s["data.verb:00009147"]
    assert shed.lemmas == ("shed", "molt", "exuviate", "moult", "slough")
    assert shed.pos == "verb"
    assert (shed.definition, shed.examples) == (SHED, ("our dog sheds every Spring",))
    act = s["data.verb:00010435"]
    assert act.lemmas == ("act", "behave", "do")  # lex_id 9 after "do" is not a word
    assert act.definition == "behave in a certain manner; show a certain behavior; conduct or comport oneself"
    assert act.examples[0] == "You should act like an adult" and len(act.examples) == 4
    assert s["data.noun:00060747"].examples == ()


def test_gloss_split_edge_cases():
    assert w.split_gloss('a definition; "one"; "two; still two"--A. Author; "three"  ') == (
        "a definition", ("one", "two; still two", "three"), False)
    assert w.split_gloss("inaccessible and sparsely populated;") == ("inaccessible and sparsely populated", (), False)
    # a quote inside the definition stays in the definition
    assert w.split_gloss('promise of reward as in "carrot and stick"; "used the carrot"') == (
        'promise of reward as in "carrot and stick"', ("used the carrot",), False)
    shopping = _synsets()["data.noun:04203889"]  # a real gloss with a stray quote
    assert shopping.definition == "the commodities purchased from stores"
    assert shopping.examples == () and shopping.unbalanced_quotes


def test_adjective_markers_are_stripped():
    line = ('00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance; '
            '"abounding confidence"; "whiskey galore"  \n')
    s = w.parse_line(line, "adj")
    assert s.lemmas == ("abounding", "galore") and s.pos == "adjective"
    assert w.clean_lemma("ready_to_hand(p)") == "ready to hand"
    assert w.clean_lemma("outback(a)") == "outback"
    assert w.parse_line("  1 This software and database is being provided to you, the LICENSEE, by  \n", "adj") is None


# -- pair texts ---------------------------------------------------------------------------------


def test_pair_texts():
    s = _synsets()
    d = w.definition_pair(s["data.noun:02084071"])
    assert (d.query, d.passage) == ("dog, domestic dog, Canis familiaris (noun)", DOG)
    u = w.usage_pair(s["data.noun:02084071"])
    assert (u.query, u.passage) == ("the dog barked all night", f"dog: {DOG}")
    u = w.usage_pair(s["data.verb:00009147"])  # "sheds": an inflected form of "shed"
    assert (u.query, u.passage) == ("our dog sheds every Spring", f"shed: {SHED}")
    u = w.usage_pair(s["data.verb:00010435"])  # the first example that uses a lemma
    assert (u.query, u.passage) == ("You should act like an adult", "act: " + s["data.verb:00010435"].definition)
    assert w.usage_pair(s["data.noun:00060747"]) is None  # no example
    assert w.uses("a huge bank of earth", "bank") and not w.uses("the banker", "bank")
    assert w.uses("he tried the Canis-familiaris trick", "Canis familiaris")


def test_build_files_dedup_and_short_definitions(tmp_path):
    out = _build(tmp_path, "a")
    defs = _rows(out / "wordnet-definitions.jsonl.gz")
    usage = _rows(out / "wordnet-usage.jsonl.gz")
    stats = json.loads((out / "stats.json").read_text())
    by_query = {r["query"]: r for r in defs}
    # "bank (noun)" is the query of three synsets: the most frequent sense (index.noun) wins
    assert by_query["bank (noun)"]["pos"] == ["sloping land (especially the slope beside a body of water)"]
    # guard and tackle share their definition: the first is kept
    assert "guard (noun)" in by_query and "tackle (noun)" not in by_query
    # definitions under 20 characters are skipped ("a hasty flight", "birth")
    assert "skedaddle (noun)" not in by_query and "whelp, pup (verb)" not in by_query
    dropped = stats["kinds"]["definition"]["dropped"]
    assert dropped == {"definition under 20 chars": 2, "duplicate passage": 1, "duplicate query": 2}
    assert len(defs) == 11 - 5
    for r in defs + usage:
        assert set(r) == {"query", "pos", "neg", "prompt"}
        assert len(r["neg"]) == 2 and r["pos"][0] not in r["neg"]
        assert all(w.normalized_text(n) != w.normalized_text(r["pos"][0]) for n in r["neg"])
    assert {r["prompt"] for r in defs} == {"Given a word or phrase, retrieve its definition"}
    assert {r["prompt"] for r in usage} == {"Given a sentence, retrieve the meaning of the word it uses"}
    assert {r["query"] for r in usage} == {
        "the dog barked all night", "our dog sheds every Spring", "You should act like an adult",
        "they pulled the canoe up on the bank", "a huge bank of earth", "the plane went into a steep bank",
        "guards must be good blockers",
    }
    # every sense of "bank" has its own sentence; tackle's definition is guard's (dropped); whelp's is "birth"
    assert stats["kinds"]["usage"]["dropped"] == {"definition under 20 chars": 1, "duplicate passage": 1}
    assert {r["pos"][0] for r in usage if r["query"] == "guards must be good blockers"} == {
        "guard: (American football) a position on the line of scrimmage"}
    assert stats["kinds"]["usage"]["by_pos"]["sampled"] == {"noun": 5, "verb": 2, "adjective": 0, "adverb": 0}
    assert stats["files"]["wordnet-definitions.jsonl.gz"]["lines"] == len(defs)
    assert not (out / "LICENSE").exists()  # the fixture has no copyright file


def test_leaks_into_eval_sets_are_dropped(tmp_path):
    ev = tmp_path / "fakeeval"
    ev.mkdir()
    (ev / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "What is a dog?"}) + "\n")
    doc = f"Dogs. The dog is {DOG}. It barks."
    (ev / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": doc}) + "\n")
    out = _build(tmp_path, "b", str(ev), str(tmp_path / "missing"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["eval_sets"] == {"checked": [str(ev)], "missing": [str(tmp_path / "missing")], "texts": 2}
    for kind, name in (("definition", "wordnet-definitions.jsonl.gz"), ("usage", "wordnet-usage.jsonl.gz")):
        k = stats["kinds"][kind]
        assert k["dropped"]["leak into fakeeval (8-gram overlap > 0.5)"] == 1
        (ex,) = k["leak_examples"]
        assert ex["source"] == "data.noun:02084071" and ex["field"] == "passage" and ex["eval"] == "fakeeval:d1"
        assert ex["overlap"] > 0.9  # 1.0 for the definition, 18/19 for "dog: <definition>"
        assert all("Canis" not in r["query"] and "dog barked" not in r["query"] for r in _rows(out / name))


def test_sampling_is_stratified_and_seeded(tmp_path):
    s = list(_synsets().values())
    cands = [(x, w.definition_pair(x)) for x in s]
    a, info = w.stratified_sample(cands, 4, seed=1)
    b, _ = w.stratified_sample(cands, 4, seed=1)
    assert [p.query for _, p in a] == [p.query for _, p in b]
    assert info["available"]["noun"] == 8 and info["available"]["verb"] == 3
    assert info["sampled"] == {"noun": 3, "verb": 1, "adjective": 0, "adverb": 0}  # 4 * 8/11 = 2.9, 4 * 3/11 = 1.1


def test_output_is_reproducible(tmp_path):
    a, b = _build(tmp_path, "a"), _build(tmp_path, "b")
    for name in ("wordnet-definitions.jsonl.gz", "wordnet-usage.jsonl.gz"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.skipif(not (ROOT / "data" / "general" / "stats.json").exists(), reason="data/general not built")
def test_shipped_files():
    out = ROOT / "data" / "general"
    stats = json.loads((out / "stats.json").read_text())
    total = 0
    for name, kind, prompt in (("wordnet-definitions.jsonl.gz", "definition", w.PROMPTS["definition"]),
                               ("wordnet-usage.jsonl.gz", "usage", w.PROMPTS["usage"])):
        rows = _rows(out / name)
        assert len(rows) == stats["files"][name]["lines"] > 0
        assert {r["prompt"] for r in rows} == {prompt}
        assert len({w.normalized_text(r["query"]) for r in rows}) == len(rows)
        for r in rows:
            assert len(r["neg"]) == len(r["neg_scores"]) == 7 and len(r["pos_scores"]) == 1
        assert stats["kinds"][kind]["negatives_with_positive_definition"] == 0
        total += (out / name).stat().st_size
    assert total < 8_000_000
    assert "Princeton" in (ROOT / "data" / "LICENSE-WordNet.txt").read_text()
