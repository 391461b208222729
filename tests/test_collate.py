"""Collation: tensors, EOS and padding, teacher scores, false-negative mask, ICL budget, the `type` table."""

from __future__ import annotations

import pytest
import torch

from data_helpers import make_tokenizer, numbered_rows, row, write_jsonl
from denselm.data.collate import Group, collate_groups
from denselm.data.config import DataConfig
from denselm.data.dataset import TrainDataset
from denselm.data.formats import TASK_TYPES
from denselm.data.tokenize import special_tokens

NORMAL = TASK_TYPES["normal"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _cfg(**kw) -> DataConfig:
    base = dict(train_data=["unused.jsonl"], prompt="Given a query", group_size=2, num_workers=0, template="bge-icl")
    base.update(kw)
    return DataConfig(**base)


def _texts(tok, tensors) -> list[str]:
    return [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(tensors["input_ids"], tensors["attention_mask"])]


def _groups(spec):
    """q0 (A, x)  q1 (B, A)  q2 (A, C)  q3 (D, E): A duplicates q0's positive twice and q2's twice."""
    return [Group(f"q{i}", None, list(p), None, p[0]) for i, p in enumerate(spec)]


DUPES = [("apple", "lemon"), ("banana", "apple"), ("apple", "cherry"), ("grape", "mango")]


def test_false_negative_mask_on_a_hand_made_batch(tok):
    batch = collate_groups(_groups(DUPES), tok, _cfg(), NORMAL, "normal", "d.jsonl")
    expected = torch.tensor([
        [0, 0, 0, 1, 1, 0, 0, 0],  # q0: q1's negative, q2's positive
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0],  # q2: q0's positive, q1's negative
        [0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(batch.false_negative_mask, expected)
    assert batch.num_false_negatives == 4
    # rank 1 of 2 holds rows q2, q3 of the same global mask; columns stay global
    r1 = collate_groups(_groups(DUPES), tok, _cfg(), NORMAL, "normal", "d.jsonl", rank=1, world_size=2)
    assert torch.equal(r1.false_negative_mask, expected[2:]) and r1.num_false_negatives == 2
    assert torch.equal(r1.local_false_negative_mask(), expected[2:, 4:])  # its own passages only
    assert torch.equal(r1.group_false_negative_mask(), torch.zeros(2, 2, dtype=torch.bool))
    r0 = collate_groups(_groups(DUPES), tok, _cfg(), NORMAL, "normal", "d.jsonl", rank=0, world_size=2)
    assert torch.equal(r0.local_false_negative_mask(), expected[:2, :4])
    # no duplicates -> no mask; the option off -> no mask
    clean = [("apple", "lemon"), ("banana", "cherry")]
    assert collate_groups(_groups(clean), tok, _cfg(), NORMAL, "normal", "d").false_negative_mask is None
    off = collate_groups(_groups(DUPES), tok, _cfg(mask_false_negatives=False), NORMAL, "normal", "d")
    assert off.false_negative_mask is None and off.num_false_negatives == 0


def test_custom_mode_counts_own_group_duplicates_only(tok):
    spec = [("apple", "apple"), ("apple", "lemon")]  # q0's negative equals its positive; q1's positive equals q0's
    batch = collate_groups(_groups(spec), tok, _cfg(), NORMAL, "custom", "d")
    assert batch.messages == ["custom"]
    assert batch.false_negative_mask.sum() == 4  # q0: cols 1, 2; q1: cols 0, 1
    assert batch.group_false_negative_mask().tolist() == [[False, True], [False, False]]
    assert batch.num_false_negatives == 1


def test_tensors_eos_padding_and_token_counts(tok):
    sp = special_tokens(tok)
    groups = _groups([("apple banana", "cherry"), ("lemon " * 80, "grape")])
    batch = collate_groups(groups, tok, _cfg(passage_max_len=16), NORMAL, "normal", "d")
    q, p = batch.query, batch.passage
    assert q["input_ids"].shape[0] == 2 and p["input_ids"].shape == (4, 16)
    assert (q["input_ids"][:, -1] == sp.eos_id).all() and (p["input_ids"][:, -1] == sp.eos_id).all()  # left padded
    first = p["attention_mask"].argmax(dim=1)
    assert (p["input_ids"][torch.arange(4), first] == sp.prefix[0]).all()  # BOS at each row's first real token
    assert (p["input_ids"][p["attention_mask"] == 0] == sp.pad_id).all()
    assert batch.num_truncated_passages == 1 and batch.num_truncated_queries == 0
    assert batch.query_tokens == int(q["attention_mask"].sum()) and batch.passage_tokens == int(p["attention_mask"].sum())
    assert _texts(tok, q) == ["Instruct: Given a query\nQuery: q0\nResponse:", "Instruct: Given a query\nQuery: q1\nResponse:"]
    kept = tok.decode(tok("lemon " * 80, add_special_tokens=False)["input_ids"][:14])  # 16 - BOS - EOS
    assert _texts(tok, p)[:3] == ["apple banana", "cherry", kept] and kept.count("lemon") == 14
    right = collate_groups(groups, tok, _cfg(padding_side="right", pad_to_multiple_of=8), NORMAL, "normal", "d")
    assert right.query["input_ids"].shape[1] % 8 == 0 and (right.query["attention_mask"][:, 0] == 1).all()
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.query["input_ids"], q["input_ids"])


def test_teacher_scores_only_when_every_example_has_them(tok):
    groups = _groups([("a", "b"), ("c", "d")])
    groups[0].scores, groups[1].scores = [0.9, 0.1], [0.8, 0.3]
    batch = collate_groups(groups, tok, _cfg(), NORMAL, "normal", "d", rank=1, world_size=2)
    assert batch.teacher_scores.dtype == torch.float32 and batch.teacher_scores.tolist() == pytest.approx([0.8, 0.3])
    groups[0].scores = None  # one example without: no distillation for the whole global batch (every rank)
    assert collate_groups(groups, tok, _cfg(), NORMAL, "normal", "d", rank=1, world_size=2).teacher_scores is None


def test_icl_examples_appear_within_the_budget(tok):
    groups = _groups([("p0", "n0"), ("p1", "n1"), ("p2", "n2")])
    groups[0].examples = [1, 2]
    one = len(tok("Instruct: Given a query\nQuery: q1\nResponse: p1\n\n", add_special_tokens=False)["input_ids"])
    cfg = _cfg(icl_max_examples=2, query_max_len=120, icl_token_budget=one)  # room for exactly one example
    batch = collate_groups(groups, tok, cfg, NORMAL, "normal", "d")
    texts = _texts(tok, batch.query)
    assert texts[0] == ("Instruct: Given a query\nQuery: q1\nResponse: p1\n\n"
                        "Instruct: Given a query\nQuery: q0\nResponse:")
    assert texts[1] == "Instruct: Given a query\nQuery: q1\nResponse:" and batch.num_icl_examples == 1
    roomy = collate_groups(groups, tok, _cfg(icl_max_examples=2, query_max_len=120, icl_token_budget=100), NORMAL, "normal", "d")
    assert _texts(tok, roomy.query)[0].count("Response: p") == 2 and roomy.num_icl_examples == 2
    # long examples are cut to their own limits before the budget applies
    groups[1].query, groups[1].icl_response = "apple " * 30, "banana " * 30
    cut = collate_groups(groups, tok, _cfg(icl_max_examples=2, query_max_len=120, icl_token_budget=100,
                                           example_query_max_len=3, example_passage_max_len=2), NORMAL, "normal", "d")
    example = _texts(tok, cut.query)[0].split("\n\n")[0]
    head = lambda text, n: tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n])
    assert example == f"Instruct: Given a query\nQuery: {head('apple ' * 30, 3)}\nResponse: {head('banana ' * 30, 2)}"
    assert example.count("apple") == 2 and example.count("banana") == 1  # cut: 3 and 2 tokens


def test_icl_in_a_dataset_never_shows_the_query_its_own_pair(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", numbered_rows("d", 12, num_neg=1))
    cfg = DataConfig(train_data=[str(tmp_path)], prompt="t", group_size=2, num_workers=0, icl_max_examples=3,
                     query_max_len=200, icl_token_budget=150, template="bge-icl")
    ds = TrainDataset(cfg, tok, per_device_batch_size=6)
    total = 0
    for epoch in range(3):
        for step in range(len(ds)):
            batch = ds[(epoch, step)]
            total += batch.num_icl_examples
            for text in _texts(tok, batch.query):
                *examples, own = text.split("\n\n")
                q = own.split("Query: ")[1].split("\n")[0]
                assert all(f"Query: {q}\n" not in e for e in examples)
    assert total > 10  # examples do appear (uniform 0..3 per query)


def _one_batch(tok, tmp_path, rows, **kw):
    write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(**{"template": "bge-icl", **kw}, train_data=[str(tmp_path / "t.jsonl")], prompt="Task", num_workers=0, group_size=4)
    ds = TrainDataset(cfg, tok, per_device_batch_size=2)
    return ds, ds[(0, 0)]


def test_type_table(tok, tmp_path):
    rows = lambda t, **e: [row(f"q{i}", [f"p{i}"], [f"n{i}a", f"n{i}b", f"n{i}c"], type=t, **e) for i in range(4)]
    # retrieval (default): group_size, plain passages, in-batch negatives
    ds, b = _one_batch(tok, tmp_path, rows("normal"))
    assert (b.passage["input_ids"].shape[0], b.messages, ds.datasets[0].group_size) == (8, ["normal"], 4)
    # only_1neg: a group of 2 whatever group_size says
    ds, b = _one_batch(tok, tmp_path, rows("only_1neg"))
    assert (b.passage["input_ids"].shape[0], b.messages) == (4, ["normal"])
    # symmetric_sts: symmetric group size, passages formatted like queries, symmetric batch size
    ds, b = _one_batch(tok, tmp_path, rows("symmetric_sts"), symmetric_group_size=3, symmetric_batch_size=4)
    assert (b.passage["input_ids"].shape[0], b.messages, ds.datasets[0].batch_size) == (12, ["normal"], 4)
    assert all(t.startswith("Instruct: Task\nQuery: ") and t.endswith("\nResponse:") for t in _texts(tok, b.passage))
    # symmetric_clustering: like sts but own-group loss; in-context responses come from "category"
    ds, b = _one_batch(tok, tmp_path, rows("symmetric_clustering", category="fruit"), symmetric_group_size=2)
    assert (b.passage["input_ids"].shape[0], b.messages) == (4, ["custom"])
    assert all(t.endswith("\nResponse:") for t in _texts(tok, b.passage))
    assert {g.icl_response for g in ds.global_groups(0, 0)[1]} == {"fruit"}
    # symmetric_class: max_class_neg + 1 passages, negatives repeated, own-group loss, plain passages
    ds, b = _one_batch(tok, tmp_path, rows("symmetric_class"), max_class_neg=5)
    assert (b.passage["input_ids"].shape[0], b.messages, b.num_repeated_negatives) == (12, ["custom"], 2)
    assert not any(t.startswith("Instruct") for t in _texts(tok, b.passage))
    # a per-file mode setting overrides the type's default
    ds, b = _one_batch(tok, tmp_path, rows("normal"), dataset_modes={"t": "custom"})
    assert b.messages == ["custom"]


def test_special_token_template_needs_added_tokens(tok, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", numbered_rows("d", 4, num_neg=1))
    cfg = DataConfig(train_data=[str(tmp_path)], prompt="Task", num_workers=0, group_size=2, template="bge-icl-special")
    with pytest.raises(ValueError, match="call denselm.data.templates.add_template_tokens"):
        TrainDataset(cfg, make_tokenizer(), per_device_batch_size=2)


def test_qwen3_tokenizer_pad_equals_eos(tmp_path):
    from tokenizer_fixtures import fixture_tokenizer

    tok = fixture_tokenizer("qwen3", fresh=True)
    sp = special_tokens(tok)
    assert sp.pad_id == sp.eos_id and sp.prefix == ()  # the case the attention mask must carry
    write_jsonl(tmp_path / "d.jsonl", numbered_rows("d", 4, num_neg=3))
    cfg = DataConfig(train_data=[str(tmp_path)], prompt="Task", num_workers=0, group_size=4, passage_max_len=8)
    batch = TrainDataset(cfg, tok, per_device_batch_size=4)[(0, 0)]
    for t in (batch.query, batch.passage):
        lengths = t["attention_mask"].sum(1)
        assert (t["input_ids"][:, -1] == sp.eos_id).all() and (t["attention_mask"][:, -1] == 1).all()
        for ids, n in zip(t["input_ids"], lengths):  # padding then the real tokens, exactly one EOS among them
            assert (ids[-int(n):] == sp.eos_id).sum() == 1
    assert _texts(tok, batch.query)[0].startswith("Instruct: Task\nQuery: d q")
