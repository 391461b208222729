"""BEIR loader: the tiny fixture, document formatting, and every kind of bad input."""

import logging
import shutil
from pathlib import Path

import pytest

from denselm.beir import format_document, load_beir, read_corpus, read_qrels

FIXTURE = Path(__file__).parent / "fixtures" / "beir_tiny"


@pytest.fixture
def beir_copy(tmp_path):
    """A writable copy of the fixture, for tests that break one file."""
    dst = tmp_path / "beir"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_fixture_loads_and_drops_queries_without_qrels(caplog):
    with caplog.at_level(logging.INFO, logger="denselm.beir"):
        data = load_beir(FIXTURE, "test")
    assert data.corpus_ids == ["d1", "d2", "d3", "d4", "d5", "d6"]
    # title + " " + text when a title exists; blank or missing titles are left out
    assert data.corpus_texts == [
        "apple banana", "apple apple cherry", "banana banana cherry", "fruit cherry date", "date date date", "elder fig",
    ]
    assert data.query_ids == ["q1", "q2", "q3", "q4"]  # q5 has no judgement
    assert data.query_texts == ["apple", "banana", "cherry", "date"]
    assert data.qrels == {
        "q1": {"d2": 2, "d1": 1},
        "q2": {"d1": 2, "d3": 1, "d5": 0},
        "q3": {"d2": 1},
        "q4": {"d6": 0},
    }
    s = data.stats
    assert (s.num_docs, s.num_queries_in_file, s.num_queries_without_qrels, s.num_queries_without_relevant) == (6, 5, 1, 1)
    assert s.num_judgements == 7 and s.num_unknown_doc_judgements == 0
    assert "1 of 5 queries have no judgements" in caplog.text


def test_format_document():
    assert format_document("Title", "body") == "Title body"
    assert format_document("", "body") == "body"
    assert format_document("  ", "body") == "body"


def test_unknown_ids_warn_count_and_drop(beir_copy, caplog):
    with open(beir_copy / "qrels" / "test.tsv", "a") as f:
        f.write("q1\tmissing-doc\t1\nq1\tother-missing\t2\nghost\td1\t1\nq5\tnope\t1\n")
    with caplog.at_level(logging.WARNING, logger="denselm.beir"):
        data = load_beir(beir_copy)
    assert data.stats.num_unknown_doc_judgements == 3
    assert data.stats.num_unknown_query_judgements == 1
    assert data.qrels["q1"] == {"d2": 2, "d1": 1}
    assert "q5" not in data.qrels  # its only judgement named an unknown doc
    assert "3 judgements name document ids missing" in caplog.text
    assert "1 judgements name query ids missing" in caplog.text


def test_malformed_json_names_file_and_line(beir_copy):
    with open(beir_copy / "corpus.jsonl", "a") as f:
        f.write('{"_id": "d7", "text": "oops"\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:7: malformed JSON"):
        load_beir(beir_copy)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"title": "t", "text": "x"}', r"corpus\.jsonl:7: missing field '_id'"),
        ('{"_id": "d7", "title": "t"}', r"corpus\.jsonl:7: missing field 'text'"),
        ('{"_id": "d7", "text": 5}', r"corpus\.jsonl:7: field 'text' must be a string"),
        ('{"_id": "d7", "title": ["a"], "text": "x"}', r"corpus\.jsonl:7: field 'title' must be a string"),
        ('{"_id": "", "text": "x"}', r"corpus\.jsonl:7: field '_id' is empty"),
        ('["d7", "x"]', r"corpus\.jsonl:7: expected a JSON object"),
        ('{"_id": "d3", "text": "again"}', r"corpus\.jsonl:7: duplicate _id 'd3' \(first on line 3\)"),
    ],
)
def test_bad_corpus_lines(beir_copy, line, message):
    with open(beir_copy / "corpus.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_beir(beir_copy)


def test_integer_ids_become_strings(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": 7, "text": "x"}\n\n{"_id": "8", "title": null, "text": "y"}\n')
    assert read_corpus(path) == (["7", "8"], ["x", "y"])


def test_duplicate_query_id(beir_copy):
    with open(beir_copy / "queries.jsonl", "a") as f:
        f.write('{"_id": "q2", "text": "again"}\n')
    with pytest.raises(ValueError, match=r"queries\.jsonl:6: duplicate _id 'q2' \(first on line 2\)"):
        load_beir(beir_copy)


def test_empty_corpus(beir_copy):
    (beir_copy / "corpus.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl: empty corpus"):
        load_beir(beir_copy)


@pytest.mark.parametrize(
    "content, message",
    [
        ("q1\td1\t1\n", r"test\.tsv:1: expected a header line"),
        ("query-id\tcorpus-id\tscore\nq1 d1 1\n", r"test\.tsv:2: expected 3 tab-separated columns"),
        ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"test\.tsv:2: field 'score' must be an integer"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq1\td1\t2\n", r"test\.tsv:4: conflicting grade 2 .* line 2 gave 1"),
        ("query-id\tcorpus-id\tscore\n\td1\t1\n", r"test\.tsv:2: empty query-id"),
    ],
)
def test_bad_qrels(tmp_path, content, message):
    path = tmp_path / "test.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_qrels(path)


def test_qrels_repeats_and_float_grades(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t1\nq1\td2\t2.0\n")
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 2}}


def test_missing_split_lists_available(beir_copy):
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv not found \(--split dev\); available splits: \['test'\]"):
        load_beir(beir_copy, "dev")


def test_no_judged_query_is_an_error(beir_copy):
    (beir_copy / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nghost\td1\t1\n")
    with pytest.raises(ValueError, match="no query .* has a judgement in split 'test'"):
        load_beir(beir_copy)
