"""Same-document masking (issue 13): ids in the data (validated) or hashes of the text, over the global batch."""

from __future__ import annotations

import pytest
import torch

from data_helpers import make_tokenizer, row, write_jsonl
from denselm.data.collate import Group, collate_groups, document_id
from denselm.data.config import DataConfig
from denselm.data.formats import TASK_TYPES, DataError, JsonlFile, index_file

NORMAL = TASK_TYPES["normal"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _cfg(**kw) -> DataConfig:
    base = dict(train_data=["unused.jsonl"], prompt="Given a query", group_size=2, num_workers=0,
                mask_same_document=True)
    base.update(kw)
    return DataConfig(**base)


def test_ids_are_read_and_validated(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        row("q0", ["p", "p2"], ["a", "b"], pos_id="doc7", neg_ids=[3, "doc8"]),
        row("q1", ["p"], ["a"], pos_ids=["x"]),
        row("q2", ["p"], ["a"]),
    ])
    f = JsonlFile(index_file(path))
    assert f.read(0).pos_ids == ["doc7", "doc7"] and f.read(0).neg_ids == ["3", "doc8"]
    assert f.read(1).pos_ids == ["x"] and f.read(1).neg_ids is None
    assert f.read(2).pos_ids is None
    for bad, message in [
        (dict(neg_ids=["a"]), r"d.jsonl:1: field 'neg_ids': 1 ids for 2 'neg' texts"),
        (dict(pos_ids="x"), r"d.jsonl:1: field 'pos_ids': expected a list"),
        (dict(neg_ids=["a", 1.5]), r"d.jsonl:1: field 'neg_ids\[1\]'"),
        (dict(pos_id=True), r"d.jsonl:1: field 'pos_id\[0\]'"),
        (dict(pos_id="a", pos_ids=["a"]), r"d.jsonl:1: fields 'pos_id' and 'pos_ids'"),
    ]:
        bad_path = write_jsonl(tmp_path / "d.jsonl", [row("q", ["p"], ["a", "b"], **bad)])
        with pytest.raises(DataError, match=message):
            index_file(bad_path)


def _group(query, passages, passage_ids, positive_ids):
    return Group(query, None, list(passages), None, passages[0], passage_ids=passage_ids, positive_ids=positive_ids)


def test_same_document_mask_by_hand_and_across_ranks(tok):
    groups = [
        _group("q0", ["intro of A", "x"], ["id:A", "id:X"], ["id:A"]),
        _group("q1", ["other part of A", "y"], ["id:A", "id:Y"], ["id:A"]),  # same document as q0's positive
        _group("q2", ["z", "w"], ["id:Z", "id:X"], ["id:Z"]),
        _group("q3", ["v", "second part of A"], ["id:V", "id:A"], ["id:V"]),
    ]
    batch = collate_groups(groups, tok, _cfg(), NORMAL, "normal", "d")
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0, [2, 7]] = True  # q0: q1's positive and q3's negative are parts of A
    expected[1, [0, 7]] = True
    assert torch.equal(batch.false_negative_mask, expected)
    assert batch.num_same_document == 4 and batch.num_false_negatives == 0
    # rank 1 of 2: rows q2, q3 of the same global mask (so cross-device scores line up)
    r1 = collate_groups(groups, tok, _cfg(), NORMAL, "normal", "d", rank=1, world_size=2)
    assert r1.false_negative_mask is None and r1.num_same_document == 0  # nothing to mask in its rows
    r0 = collate_groups(groups, tok, _cfg(), NORMAL, "normal", "d", rank=0, world_size=2)
    assert torch.equal(r0.false_negative_mask, expected[:2])
    off = collate_groups(groups, tok, _cfg(mask_same_document=False), NORMAL, "normal", "d")
    assert off.false_negative_mask is None


def test_hash_ids_compose_with_duplicate_text_mask(tok):
    """Without ids: a hash of the text, and every positive of the example counts as its document."""
    pos0 = ["apple", "apple pie"]
    groups = [
        _group("q0", ["apple", "lemon"], [document_id(pos0, None, 0), document_id(["lemon"], None, 0)],
               [document_id(pos0, None, j) for j in range(2)]),
        _group("q1", ["apple pie", "apple"], [document_id(["apple pie"], None, 0), document_id(["apple"], None, 0)],
               [document_id(["apple pie"], None, 0)]),
    ]
    batch = collate_groups(groups, tok, _cfg(), NORMAL, "normal", "d")
    # q0: "apple" at col 3 is a duplicate (text mask) and same document; "apple pie" at col 2 is its other positive
    assert batch.false_negative_mask.nonzero().tolist() == [[0, 2], [0, 3]]
    assert batch.num_false_negatives == 1 and batch.num_same_document == 2
    assert document_id(["t"], ["7"], 0) == "id:7" and document_id(["7"], None, 0).startswith("sha1:")


def test_dataset_fills_document_ids(tmp_path, tok):
    from denselm.data.dataset import TrainDataset

    path = write_jsonl(tmp_path / "d.jsonl", [
        row(f"q{i}", [f"p{i}"], [f"n{i}"], pos_id=f"doc{i % 2}", neg_ids=[f"doc{(i + 1) % 2}"]) for i in range(4)
    ])
    cfg = DataConfig(train_data=[str(path)], prompt="Q", group_size=2, num_workers=0, mask_same_document=True,
                     mask_false_negatives=False)
    ds = TrainDataset(cfg, tok, per_device_batch_size=4)
    _, groups = ds.global_groups(0, 0)
    for g in groups:
        assert g.passage_ids[0] in g.positive_ids and g.passage_ids[1] not in g.positive_ids
    batch = ds.batch(0, 0)
    # two documents, every query: its own negative is the other doc; every other passage of its doc is masked
    assert batch.num_same_document == 4 * 3
