"""scripts/build_pyfaq_data.py: reST parsing and cleaning, pair extraction, leak check, mining, shipped data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from data_helpers import ROOT, load_script

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


b = load_script("build_pyfaq_data")

DOC = """\
:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

Intro with :func:`dumps` and :class:`~json.decoder.JSONDecoder`.

.. _basic-usage:

Basic Usage
-----------

Use it like this::

    >>> json.dumps([1])
    Not a heading
    -------------

Text after the example.

Short underline?
---

.. function:: dumps(obj, *, indent=None)
              dump(obj, fp)

   Serialize *obj*.  See :ref:`basic-usage`.

   .. versionadded:: 3.2

.. class:: JSONDecoder(object_hook=None)

   Simple JSON decoder.

   .. method:: decode(s)

      Return the Python representation of ``s``.

.. index:: single: hidden

.. This is a comment
   spanning two lines.
"""


def test_split_sections_levels_and_literal_blocks():
    sections = b.split_sections(DOC, "library/json")
    assert [(s.heading, s.level) for s in sections] == [
        (":mod:`json` --- JSON encoder", 0),
        ("Basic Usage", 1),
        ("Short underline?", 1),
    ]
    assert sections[1].labels == ["basic-usage"]
    assert sections[1].line_no == 11
    # the heading-like lines inside the literal block stay in the body
    assert "    Not a heading" in sections[1].lines


def test_render_rst_markup():
    sections = b.split_sections(DOC, "library/json")
    labels = {"basic-usage": "Basic Usage"}
    intro = b.render_rst(sections[0].lines, labels)
    assert intro == "Intro with dumps() and JSONDecoder."
    usage = b.render_rst(sections[1].lines, labels)
    assert usage == "Use it like this:\n\n>>> json.dumps([1])\nNot a heading\n-------------\n\nText after the example."
    api = b.render_rst(sections[2].lines, labels)
    assert api.split("\n\n") == [
        "dumps(obj, *, indent=None)\ndump(obj, fp)",
        "Serialize obj.  See Basic Usage.",
        "New in version 3.2.",
        "JSONDecoder(object_hook=None)",
        "Simple JSON decoder.",
        "decode(s)",
        "Return the Python representation of s.",
    ]
    assert "hidden" not in api and "comment" not in api
    class_only = b.render_rst(["Simple.", "", ".. method:: decode(s)", "", "   Hidden."], drop_api_bodies=True)
    assert class_only == "Simple."


@pytest.mark.parametrize(
    "rst, text",
    [
        (":meth:`str.join`", "str.join()"),
        (":func:`open() <open>`", "open()"),
        (":pep:`8`", "PEP 8"),
        (":term:`file objects <file object>`", "file objects"),
        ("`Python <https://python.org>`_", "Python"),
        ("**bold** and *emph* but 2 * 3 * 4", "bold and emph but 2 * 3 * 4"),
        ("a footnote [#]_ here", "a footnote here"),
        (":ref:`unknown-label`", "unknown label"),
        ("``*args``", "*args"),
        (":meth:`.gettext`", "gettext()"),
        (":mod:`documented in the\nLibrary <pdb>`", "documented in the\nLibrary"),
    ],
)
def test_clean_inline(rst, text):
    assert b.clean_inline(rst) == text


def test_literal_block_in_list_item_ends_at_item_text():
    lines = ["* Use :func:`getattr`::", "", "     getattr(foo, 'bar')()", "", "  Note that :func:`getattr` works."]
    assert b.render_rst(lines) == "* Use getattr():\n\ngetattr(foo, 'bar')()\n\nNote that getattr() works."


def test_grid_table_rows_keep_cell_text():
    lines = ["+--------+------------+", "| ``x | y`` | bitwise *or* |", "+========+", "| .. c:macro:: PyBUF_X | yes |", "+--+"]
    assert b.render_rst(lines) == "x | y | bitwise or\nPyBUF_X | yes"


def test_directives():
    lines = [
        ".. note::",
        "   Be careful.",
        "",
        ".. versionchanged:: 3.3",
        "   Added *x*.",
        "",
        ".. code-block:: python",
        "   :linenos:",
        "",
        "   if x:",
        "       y()",
        "",
        ".. deprecated-removed:: 3.4 3.12",
    ]
    assert b.render_rst(lines) == (
        "Note:\nBe careful.\n\nChanged in version 3.3:\nAdded x.\n\nif x:\n    y()\n\n"
        "Deprecated since version 3.4, will be removed in version 3.12:"
    )


def _docs(text: str, path: str):
    sections = b.split_sections(text, path)
    return [b.Doc(path, sections[0].heading, sections)]


FAQ_DOC = """\
===========
Library FAQ
===========

General
=======

How do I sort?
--------------

Use :func:`sorted`.

Why is this here?
-----------------

See the next question.

Is it fast?
-----------

Yes.
"""


def test_faq_pairs_ids_and_pointer_answers():
    docs = _docs(FAQ_DOC, "faq/library")
    kept, dropped = b.faq_pairs(docs, {})
    assert [(e["id"], e["question"], e["answer"]) for e in kept] == [
        ("faq-library-1", "How do I sort?", "Use sorted()."),
        ("faq-library-3", "Is it fast?", "Yes."),
    ]
    assert [e["id"] for e in dropped] == ["faq-library-2"]
    kept, dropped = b.faq_pairs(docs, {}, drop_pointers=False)
    assert len(kept) == 3 and not dropped


def test_api_pairs_are_qualified():
    pairs = b.api_pairs(_docs(DOC, "library/json"), {})
    assert [(p.query, p.passage) for p in pairs] == [
        ("json.dumps(obj, *, indent=None)\njson.dump(obj, fp)", "Serialize obj.  See basic usage.\n\nNew in version 3.2."),
        ("json.JSONDecoder(object_hook=None)", "Simple JSON decoder."),  # its method is left out
        ("json.JSONDecoder.decode(s)", "Return the Python representation of s."),
    ]
    assert not b.api_pairs(_docs(DOC, "faq/json"), {})  # never from faq/


def test_section_pairs_and_glossary():
    pairs = b.section_pairs(_docs(DOC, "library/json"), {})
    assert [(p.kind, p.query) for p in pairs] == [
        ("sections", "json \u2014 JSON encoder"),
        ("sections", "json \u2014 JSON encoder: Basic Usage"),
        ("sections", "json \u2014 JSON encoder: Short underline?"),  # under 3 words: not a question
    ]
    glossary = "Glossary\n========\n\n.. glossary::\n\n   ``>>>``\n      The prompt.\n\n   BDFL\n   dictator\n      Guido, see :pep:`1`.\n"
    pairs = b.glossary_pairs(_docs(glossary, "glossary"), {})
    assert [(p.query, p.passage) for p in pairs] == [(">>>", "The prompt."), ("BDFL, dictator", "Guido, see PEP 1.")]


def test_leak_detector_and_filter():
    answer = " ".join(f"w{i}" for i in range(40))
    detector = b.LeakDetector([answer])
    copied = " ".join(f"w{i}" for i in range(20)) + " " + " ".join(f"other{i}" for i in range(10))
    # 13 of the copy's 23 8-grams are in the answer: 13 / min(23, 33) > 0.5
    assert detector.overlap(copied) == (pytest.approx(13 / 23), 0)
    assert detector.leaks(copied)
    assert not detector.leaks(" ".join(f"other{i}" for i in range(40)))
    faq = [{"id": "faq-x-1", "question": "How do I sort?", "answer": answer}]
    pairs = [
        b.Pair("sections", "A: b", "x" * 50, "s1"),
        b.Pair("sections", "A: b", "y" * 50, "s2"),  # duplicate query
        b.Pair("api", "f()", "x" * 50, "s3"),  # duplicate passage
        b.Pair("questions", "How do I sort?", "z" * 50, "s4"),  # a FAQ question
        b.Pair("sections", "A: c", copied + " pad" * 10, "s5"),  # FAQ leak
        b.Pair("api", "g()", "short", "s6"),
        b.Pair("glossary", "term", "w " * 600, "s7"),  # truncated to 100 chars
    ]
    stats = {}
    kept = b.filter_pairs(pairs, faq, max_chars=100, min_chars=40, stats=stats)
    assert [p.source for p in kept] == ["s1", "s7"]
    assert len(kept[1].passage) == 99 and kept[1].passage.endswith("w")
    assert sum(stats["dropped"].values()) == 5


def test_mine_bm25_negatives():
    texts = [f"python topic{i} " + " ".join(f"word{j}" for j in range(i % 5)) for i in range(40)]
    pairs = [b.Pair("sections", f"python topic{i}", t, str(i)) for i, t in enumerate(texts)]
    pairs.append(b.Pair("sections", "zzz", "unrelated words only here", "x"))
    stats = {}
    negs = b.mine_bm25_negatives(pairs, num_neg=7, first_rank=3, last_rank=30, seed=0, stats=stats)
    assert all(len(n) == 7 for n in negs)
    for p, n in zip(pairs, negs):
        assert p.passage not in n and len(set(n)) == 7
    # "zzz" matches nothing: all 7 negatives are random fills
    assert stats["bm25_negatives"]["random_fill"] == 7


def test_mine_bm25_negatives_drops_positive_up_to_case_and_punctuation():
    # api.jsonl.gz line 1569 once had its positive plus a final period as a negative: the
    # pool here holds that copy (and a re-cased, re-spaced one), BM25's best matches after the positive
    pos = "type_comment is an optional string with the type annotation as a comment"
    copies = [pos + ".", "Type_comment  is an optional string, with the type annotation as a comment!"]
    others = [f"the ast module node number {i} has fields and a string annotation" for i in range(12)]
    pairs = [b.Pair("api", "ast.arg.type_comment type annotation comment", pos, "a")]
    pairs += [b.Pair("api", f"q{k}", t, f"c{k}") for k, t in enumerate(copies + others)]
    stats = {}
    negs = b.mine_bm25_negatives(pairs, num_neg=7, first_rank=1, last_rank=30, seed=0, stats=stats)
    assert len(negs[0]) == 7 and not set(copies) & set(negs[0])
    assert b.normalized_text(pos) == b.normalized_text(copies[0]) == b.normalized_text(copies[1])
    assert b.normalized_text("a.b(x)") == "abx" != b.normalized_text("a+b")
    assert stats["bm25_negatives"]["dropped_same_as_positive"] == 2  # both copies, from the first line's ranking
    # the copies' own queries match nothing: their negatives are random fills, which skip copies too
    for n in negs[1:3]:
        assert not {pos, *copies} & set(n)


@pytest.mark.slow  # a real asset
def test_real_faq_has_173_pairs():
    faq_dir = SOURCES / "faq"
    if not faq_dir.is_dir():
        pytest.skip("python3.11-doc is not installed")
    docs = []
    for f in sorted(faq_dir.glob("*.rst.txt")):
        docs += _docs(f.read_text(), f"faq/{f.name[: -len('.rst.txt')]}")
    kept, dropped = b.faq_pairs(docs, {})
    assert len(kept) == 173
    assert [e["source"] for e in dropped] == ["faq/design.rst.txt:47", "faq/programming.rst.txt:1023"]
    assert len({e["id"] for e in kept}) == 173


def _read_jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_data_is_consistent():
    data = ROOT / "data"
    if not (data / "pyfaq" / "queries.jsonl").is_file():
        pytest.skip("data/ not built")
    queries = _read_jsonl(data / "pyfaq" / "queries.jsonl")
    corpus = _read_jsonl(data / "pyfaq" / "corpus.jsonl")
    qrels = (data / "pyfaq" / "qrels" / "test.tsv").read_text().splitlines()
    assert len(queries) == len(corpus) == len(qrels) - 1 == 173
    assert {l.split("\t")[1] for l in qrels[1:]} == {d["_id"] for d in corpus}
    large = data / "pyfaq-large"
    large_corpus = next(p for p in (large / "corpus.jsonl", large / "corpus.jsonl.gz") if p.is_file())
    large_ids = {d["_id"] for d in _read_jsonl(large_corpus)}
    assert {d["_id"] for d in corpus} <= large_ids and len(large_ids) > 4000
    answers = {d["text"] for d in corpus}
    for kind in b.KINDS:
        rows = _read_jsonl(data / "pytrain" / f"{kind}.jsonl.gz")
        assert rows, kind
        for r in rows[:200]:
            assert len(r["pos"]) == 1 and len(r["neg"]) == 7 and r["pos"][0] not in r["neg"]
            assert r["prompt"] in b.PROMPTS[kind]
            assert not answers & {r["pos"][0], *r["neg"]}
            if "pos_scores" in r:
                assert len(r["pos_scores"]) == 1 and len(r["neg_scores"]) == 7
                assert all(-1 <= s <= 1 for s in r["pos_scores"] + r["neg_scores"])
    assert (data / "LICENSE-PSF.txt").read_text().count("PSF LICENSE AGREEMENT") == 1
