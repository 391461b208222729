"""JSONL schema: the bad-input matrix (exact messages), lazy reading by offset, file discovery, config errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from data_helpers import make_tokenizer, numbered_rows, row, write_jsonl
from denselm.data.config import DataConfig
from denselm.data.dataset import TrainDataset
from denselm.data.formats import DataError, JsonlFile, discover_files, index_file

GOOD = json.dumps(row("q", ["p"], ["n1", "n2"]))

# (second line of the file, the message after "FILE:2: ")
BAD_LINES = [
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"pos": ["p"], "neg": ["n"]}', "field 'query': missing"),
    ('{"query": 3, "pos": ["p"], "neg": ["n"]}', "field 'query': expected a string, got int"),
    ('{"query": "", "pos": ["p"], "neg": ["n"]}', "field 'query': empty string"),
    ('{"query": "q", "neg": ["n"]}', "field 'pos': missing"),
    ('{"query": "q", "pos": "p", "neg": ["n"]}', "field 'pos': expected a list of strings, got str"),
    ('{"query": "q", "pos": [], "neg": ["n"]}', "field 'pos': empty list (each query needs at least one positive)"),
    ('{"query": "q", "pos": ["p", null], "neg": ["n"]}', "field 'pos[1]': expected a string, got null"),
    ('{"query": "q", "pos": ["p"]}', "field 'neg': missing (the group size needs negatives)"),
    ('{"query": "q", "pos": ["p"], "neg": []}', "field 'neg': empty list (the group size needs negatives)"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", 7]}', "field 'neg[1]': expected a string, got int"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0]}',
     "field 'pos_scores': 2 scores for 1 'pos' texts (must be aligned)"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": 0.5}',
     "field 'neg_scores': expected a list of numbers, got float"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m"], "neg_scores": [0.1, "x"]}',
     "field 'neg_scores[1]': expected a finite number, got 'x'"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [NaN]}',
     "field 'neg_scores[0]': expected a finite number, got nan"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [true]}',
     "field 'pos_scores[0]': expected a finite number, got True"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "prompt": 5}', "field 'prompt': expected a string, got int"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "type": "rerank"}',
     "field 'type': unknown type 'rerank' (known: normal, retrieval, only_1neg, symmetric_sts, "
     "symmetric_clustering, symmetric_class)"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "type": "only_1neg"}',
     "field 'type': 'only_1neg' differs from 'normal' on line 1 (one file is one dataset with one type)"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_LINES)])
def test_bad_line_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        index_file(path, group_size=8)
    assert str(err.value) == f"{path}:2: {message}"
    assert isinstance(err.value, ValueError)


def test_malformed_json_and_invalid_utf8(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"query": "q", "pos": ["p"]'])
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON: Expecting ',' delimiter \(column 28\)$"):
        index_file(path)
    bad = tmp_path / "u.jsonl"
    bad.write_bytes(GOOD.encode() + b"\n" + b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}\n')
    with pytest.raises(DataError) as err:
        index_file(bad)
    assert str(err.value) == f"{bad}:2: invalid UTF-8 at byte 14 of the line"


def test_missing_prompt_without_global_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row("q", ["p"], ["n"], prompt="task"), row("q2", ["p"], ["n"])])
    index_file(path, prompt_available=True)
    with pytest.raises(DataError) as err:
        index_file(path, prompt_available=False)
    assert str(err.value) == f"{path}:2: field 'prompt': missing, and no global prompt is set (data.prompt)"


def test_negatives_optional_only_for_group_size_one(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row("q", ["p"], []), {"query": "q2", "pos": ["p2"]}])
    assert len(index_file(path, group_size=1)) == 2
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'neg': empty list"):
        index_file(path, group_size=2)
    # only_1neg forces a group of 2 whatever group_size says
    pairs = write_jsonl(tmp_path / "p.jsonl", [row("q", ["p"], [], type="only_1neg")])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'neg': empty list"):
        index_file(pairs, group_size=1)


def test_offsets_and_lazy_reads_skip_blank_lines_and_crlf(tmp_path):
    rows = numbered_rows("d", 4, num_neg=2)
    lines = [json.dumps(r) for r in rows]
    raw = (lines[0] + "\n\n" + lines[1] + "\r\n   \n" + lines[2] + "\n" + lines[3]).encode()  # no final newline
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    index = index_file(path)
    assert len(index) == 4
    assert index.offsets.dtype == np.int64
    assert index.offsets.tolist() == [raw.index(line.encode()) for line in lines]
    assert index.num_neg.tolist() == [2, 2, 2, 2]
    assert index.num_bytes == len(raw)
    f = JsonlFile(index)
    assert [f.read(i).query for i in range(4)] == ["d q0", "d q1", "d q2", "d q3"]
    assert f.read(3).neg == ["d n3_0", "d n3_1"]
    clone = pickle.loads(pickle.dumps(f))  # what a DataLoader worker receives: no mmap, reopened on use
    assert clone._mm is None and clone.read(1).pos == ["d p1"]


def test_scores_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        row("q", ["p"], ["a", "b"], pos_scores=[1], neg_scores=[0.5, -2]),
        row("q2", ["p"], ["a"], pos_scores=[1.0]),  # neg_scores missing: not a teacher example
        row("q3", ["p"], ["a", "b", "c"], pos_scores=None, neg_scores=None),
    ])
    index = index_file(path)
    assert index.num_with_scores == 1
    assert index.num_neg.tolist() == [2, 1, 3]
    ex = JsonlFile(index).read(0)
    assert ex.pos_scores == [1.0] and ex.neg_scores == [0.5, -2.0] and ex.has_scores


def test_empty_file_and_discovery(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{empty}: no examples \(the file is empty\)$"):
        index_file(empty)
    folder = tmp_path / "f"
    write_jsonl(folder / "b.jsonl", [GOOD])
    write_jsonl(folder / "sub" / "a.jsonl", [GOOD])
    (folder / "notes.txt").write_text("not data")
    single = write_jsonl(tmp_path / "single.jsonl", [GOOD])
    assert discover_files([str(folder), str(single)]) == [
        (str(folder / "b.jsonl"), str(folder)), (str(folder / "sub" / "a.jsonl"), str(folder)),
        (str(single), str(single)),
    ]
    with pytest.raises(DataError, match=r"missing.jsonl: no such file or folder \(data.train_data\)"):
        discover_files([str(tmp_path / "missing.jsonl")])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: folder has no \*\.jsonl or \*\.jsonl\.gz files"):
        discover_files([str(tmp_path / "nothing")])
    with pytest.raises(DataError, match=r"listed twice"):
        discover_files([str(single), str(single)])


def test_dataset_reports_bad_line_and_unknown_setting_keys(tmp_path):
    tok = make_tokenizer()
    good = write_jsonl(tmp_path / "good.jsonl", numbered_rows("g", 8))
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"query": "q", "pos": [], "neg": ["n"]}'])
    cfg = DataConfig(train_data=[str(good), str(bad)], prompt="p", num_workers=0)
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'pos': empty list"):
        TrainDataset(cfg, tok, per_device_batch_size=2)
    cfg = DataConfig(train_data=[str(good)], prompt="p", dataset_weights={"nope": 2.0}, num_workers=0)
    with pytest.raises(DataError, match=r"^data.dataset_weights\['nope'\]: matches no training file$"):
        TrainDataset(cfg, tok, per_device_batch_size=2)
    cfg = DataConfig(train_data=[str(good)], prompt="p", num_workers=0)
    with pytest.raises(DataError, match=r"no complete global batch of 16 queries"):
        TrainDataset(cfg, tok, per_device_batch_size=8, world_size=2)


@pytest.mark.parametrize("kwargs,message", [
    ({"group_size": 0}, "data.group_size must be an integer >= 1, got 0"),
    ({"query_max_len": 2.5}, "data.query_max_len must be an integer >= 1, got 2.5"),
    ({"template": "bge"}, "data.template must be one of bge-icl, bge-icl-special, e5-mistral, qwen3-embedding, none; got 'bge'"),
    ({"padding_side": "middle"}, "data.padding_side must be 'left' or 'right', got 'middle'"),
    ({"dataset_weights": {"a": -1}}, "data.dataset_weights['a'] must be a finite number >= 0, got -1"),
    ({"dataset_modes": {"a": "inbatch"}}, "data.dataset_modes['a'] must be 'normal' or 'custom', got 'inbatch'"),
    ({"icl_max_examples": 2, "template": "e5-mistral"},
     "data.icl_max_examples > 0 needs template bge-icl or bge-icl-special, got 'e5-mistral'"),
    ({"icl_max_examples": 2, "icl_token_budget": 64, "query_max_len": 64, "template": "bge-icl"},
     "data.icl_token_budget must be between 1 and data.query_max_len - 1 (63), got 64"),
    ({"max_examples_per_dataset": 0}, "data.max_examples_per_dataset must be an integer >= 1, got 0"),
    ({"seed": -1}, "data.seed must be an integer >= 0, got -1"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        DataConfig(train_data=["x.jsonl"], **kwargs)
    assert str(err.value) == message


def test_config_accepts_single_path_and_resolves_budget():
    cfg = DataConfig(train_data="x.jsonl", query_max_len=100)
    assert cfg.train_data == ["x.jsonl"] and cfg.resolved_icl_token_budget == 50


def test_gzipped_file_is_indexed_and_errors_name_the_gz(tmp_path, monkeypatch):
    import gzip
    import json as _json

    from denselm.data.formats import JsonlFile, discover_files, index_file

    monkeypatch.setenv("DENSELM_CACHE", str(tmp_path / "cache"))
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]} for i in range(3)]
    gz = tmp_path / "d" / "a.jsonl.gz"
    gz.parent.mkdir()
    with gzip.open(gz, "wt") as f:
        f.write("".join(_json.dumps(r) + "\n" for r in rows))
    assert [f for f, _ in discover_files([str(tmp_path / "d")])] == [str(gz)]
    index = index_file(gz, group_size=2)
    assert len(index) == 3 and JsonlFile(index).read(2).query == "q2"
    bad = tmp_path / "d" / "b.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(_json.dumps(rows[0]) + "\n" + '{"query": 1, "pos": ["x"], "neg": ["y"]}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl\.gz:2"):
        index_file(bad, group_size=2)
