"""Sampling: negative repetition, weights and caps, same-dataset batches, rank slices, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data_helpers import make_tokenizer, numbered_rows, write_jsonl
from denselm.data.config import DataConfig
from denselm.data.dataset import StepSampler, TrainDataset, build_dataloader
from denselm.data.sampling import (
    DatasetPlan,
    batches_per_epoch,
    cap_indices,
    epoch_batches,
    false_negative_mask,
    rank_slice,
    rng_for,
    sample_group,
    sample_icl,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _texts(tok, tensors) -> list[str]:
    return [tok.decode(ids[mask.bool()]) for ids, mask in zip(tensors["input_ids"], tensors["attention_mask"])]


def _same(a, b) -> bool:
    """Two TrainBatch objects hold identical tensors and counts."""
    if a.stats() != b.stats() or a.dataset != b.dataset or a.messages != b.messages:
        return False
    for x, y in ((a.query, b.query), (a.passage, b.passage)):
        if any(not torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask")):
            return False
    return (a.false_negative_mask is None) == (b.false_negative_mask is None)


# --- pure functions ------------------------------------------------------------------------------


def test_rng_is_a_function_of_its_keys():
    a = rng_for(7, 3, 1, 2).integers(1 << 30, size=4)
    assert np.array_equal(a, rng_for(7, 3, 1, 2).integers(1 << 30, size=4))
    assert not np.array_equal(a, rng_for(7, 3, 2, 1).integers(1 << 30, size=4))
    assert not np.array_equal(a, rng_for(8, 3, 1, 2).integers(1 << 30, size=4))


def test_negative_repetition_follows_the_seed():
    # 3 negatives, group 8 needs 7: the list repeated ceil(7/3) = 3 times (9 slots), 7 drawn without
    # replacement; only 2 slots stay out, so every negative appears 1..3 times.
    for trial in range(50):
        pos, negs, repeated = sample_group(2, 3, 8, rng_for(0, trial))
        assert repeated and len(negs) == 7 and pos in (0, 1)
        counts = Counter(negs)
        assert set(counts) == {0, 1, 2} and all(1 <= c <= 3 for c in counts.values())
    # enough negatives: distinct, no repetition flagged
    _, negs, repeated = sample_group(1, 10, 8, rng_for(0, 1))
    assert not repeated and len(set(negs)) == 7 and max(negs) < 10
    # exactly enough: a permutation of all of them
    _, negs, repeated = sample_group(1, 7, 8, rng_for(0, 2))
    assert not repeated and sorted(negs) == list(range(7))
    assert sample_group(1, 0, 1, rng_for(0, 3)) == (0, [], False)
    # the positive is chosen uniformly among several
    assert {sample_group(3, 5, 2, rng_for(1, t))[0] for t in range(60)} == {0, 1, 2}


@pytest.mark.parametrize("weight,expected", [(1.0, 3), (2.0, 6), (0.5, 1), (2.5, 7), (0.0, 0), (0.2, 0), (0.25, 1)])
def test_batches_per_epoch_from_weights(weight, expected):
    # 10 examples, batches of 3: a pass gives 3 batches (1 left over, dropped); 0.5 -> 5 examples -> 1;
    # 0.25 -> 2.5 rounds half up to 3 examples -> 1
    assert batches_per_epoch(DatasetPlan(np.arange(10), 3, weight)) == expected


def test_epoch_batches_are_single_dataset_weighted_and_shuffled():
    plans = [DatasetPlan(np.arange(10), 3, 2.0), DatasetPlan(np.arange(100, 107), 2, 1.0)]
    batches = epoch_batches(plans, seed=5, epoch=0)
    assert [d for d, _ in batches].count(0) == 6 and [d for d, _ in batches].count(1) == 3
    seen = Counter()
    for d, idx in batches:
        assert len(idx) == plans[d].batch_size and len(set(idx.tolist())) == len(idx)  # no duplicate in a batch
        assert set(idx.tolist()) <= set(plans[d].indices.tolist())
        seen.update(idx.tolist())
    assert max(seen[i] for i in range(10)) <= 2  # two passes of dataset 0
    again = epoch_batches(plans, seed=5, epoch=0)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    other = epoch_batches(plans, seed=5, epoch=1)
    assert any(a[0] != b[0] or not np.array_equal(a[1], b[1]) for a, b in zip(batches, other))


def test_cap_is_fixed_for_the_run():
    kept = cap_indices(100, 10, seed=3, dataset=0)
    assert len(kept) == 10 and np.array_equal(kept, np.unique(kept))
    assert np.array_equal(kept, cap_indices(100, 10, seed=3, dataset=0))
    assert not np.array_equal(kept, cap_indices(100, 10, seed=3, dataset=1))
    assert np.array_equal(cap_indices(5, 10, 3, 0), np.arange(5))
    assert np.array_equal(cap_indices(5, None, 3, 0), np.arange(5))


def test_rank_slices():
    assert [rank_slice(8, 2, r) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="not divisible"):
        rank_slice(6, 4, 0)


def test_icl_choice_never_uses_the_own_pair():
    keys = ["a", "b", "a", "c", "d"]
    for t in range(100):
        chosen = sample_icl(0, keys, 3, rng_for(0, t))
        assert 0 not in chosen and 2 not in chosen  # own position, and the same query text elsewhere
        assert len(chosen) == len(set(chosen)) <= 3
    counts = Counter(len(sample_icl(1, keys, 3, rng_for(1, t))) for t in range(400))
    assert set(counts) == {0, 1, 2, 3}  # uniform in 0..3
    assert sample_icl(0, keys, 0, rng_for(0, 0)) == []


def test_false_negative_mask_by_hand():
    # 3 queries x group 2: q0 (A, x)  q1 (B, A)  q2 (A, C) -> A is q0's and q2's positive and q1's negative
    keys = ["A", "x", "B", "A", "A", "C"]
    mask = false_negative_mask(keys, 2, rows=[0, 1, 2])
    assert mask.tolist() == [
        [False, False, False, True, True, False],  # q0: q1's negative and q2's positive are its positive
        [False, False, False, False, False, False],  # q1: B appears nowhere else
        [True, False, False, True, False, False],  # q2: q0's positive and q1's negative
    ]
    assert false_negative_mask(keys, 2, rows=[2]).tolist() == [mask[2].tolist()]


# --- datasets end to end -----------------------------------------------------------------------------


@pytest.fixture()
def two_datasets(tmp_path):
    write_jsonl(tmp_path / "data" / "alpha.jsonl", numbered_rows("alpha", 21, num_neg=2))
    write_jsonl(tmp_path / "data" / "beta.jsonl", numbered_rows("beta", 10))
    return tmp_path / "data"


def _cfg(path, **kw) -> DataConfig:
    base = dict(train_data=[str(path)], prompt="Given a query", group_size=4, num_workers=0, seed=11, template="bge-icl")
    base.update(kw)
    return DataConfig(**base)


def test_same_dataset_batches_and_negative_counts(tok, two_datasets):
    ds = TrainDataset(_cfg(two_datasets), tok, per_device_batch_size=4)
    # 21 // 4 = 5 batches of alpha, 10 // 4 = 2 of beta
    assert len(ds) == 7 and [i.batches_per_epoch for i in ds.datasets] == [5, 2]
    assert [i.num_short_negatives for i in ds.datasets] == [21, 0]  # alpha: 2 negatives for a group of 4
    seen = Counter()
    for step in range(len(ds)):
        info, groups = ds.global_groups(0, step)
        name = "alpha" if info.name.endswith("alpha.jsonl") else "beta"
        assert all(g.query.startswith(name) and all(p.startswith(name) for p in g.passages) for g in groups)
        seen[name] += 1
        batch = ds[(0, step)]
        assert batch.dataset == info.name and batch.messages == ["normal"]
        assert batch.num_repeated_negatives == (4 if name == "alpha" else 0)
        assert batch.query["input_ids"].shape[0] == 4 and batch.passage["input_ids"].shape[0] == 16
    assert seen == {"alpha": 5, "beta": 2}
    assert "21 with too few negatives (repeated)" in ds.summary()


def test_weights_and_caps_end_to_end(tok, two_datasets):
    cfg = _cfg(two_datasets, dataset_weights={"beta": 2.0, "alpha.jsonl": 0.5}, max_examples_per_dataset=9)
    ds = TrainDataset(cfg, tok, per_device_batch_size=3)
    # alpha: capped to 9, weight 0.5 -> 5 examples -> 1 batch of 3; beta: capped to 9, two passes -> 6 batches
    assert [len(i.plan.indices) for i in ds.datasets] == [9, 9]
    assert [i.batches_per_epoch for i in ds.datasets] == [1, 6] and len(ds) == 7
    kept_beta = {f"beta q{i}" for i in ds.datasets[1].plan.indices}
    for epoch in range(3):
        beta = Counter(g.query for s in range(len(ds)) for g in ds.global_groups(epoch, s)[1] if g.query.startswith("beta"))
        assert set(beta) == kept_beta and set(beta.values()) == {2}  # the same 9 every epoch, twice each


def test_ranks_hold_disjoint_equal_slices_of_one_global_batch(tok, two_datasets):
    ranks = [TrainDataset(_cfg(two_datasets), tok, per_device_batch_size=2, world_size=2, rank=r) for r in range(2)]
    single = TrainDataset(_cfg(two_datasets), tok, per_device_batch_size=4)
    assert len(ranks[0]) == len(single) == 7
    for step in range(len(single)):
        parts = [ds[(1, step)] for ds in ranks]
        whole = single[(1, step)]
        assert parts[0].query["input_ids"].shape[0] == parts[1].query["input_ids"].shape[0] == 2
        assert parts[0].passage["input_ids"].shape[0] == parts[1].passage["input_ids"].shape[0] == 8
        q = [_texts(tok, p.query) for p in parts]
        assert not set(q[0]) & set(q[1])
        assert q[0] + q[1] == _texts(tok, whole.query)  # same global batch, rank r holds slice r
        assert _texts(tok, parts[0].passage) + _texts(tok, parts[1].passage) == _texts(tok, whole.passage)
        assert parts[0].dataset == parts[1].dataset == whole.dataset


def test_same_position_same_batch_across_instances_and_workers(tok, two_datasets):
    cfg = _cfg(two_datasets, icl_max_examples=2, query_max_len=96)
    a = TrainDataset(cfg, tok, per_device_batch_size=4)
    b = TrainDataset(cfg, tok, per_device_batch_size=4)
    assert all(_same(a[(2, s)], b[(2, s)]) for s in range(len(a)))
    assert not all(_same(a[(0, s)], a[(1, s)]) for s in range(len(a)))  # epochs differ
    in_process = list(build_dataloader(a, start_epoch=0, start_step=0, num_batches=10, num_workers=0))
    workers = list(build_dataloader(a, start_epoch=0, start_step=0, num_batches=10, num_workers=2))
    assert [(x.epoch, x.step) for x in in_process] == [(0, s) for s in range(7)] + [(1, 0), (1, 1), (1, 2)]
    assert all(_same(x, y) for x, y in zip(in_process, workers))
    # resume after 5 batches: exactly the tail of the uninterrupted run
    epoch, step = a.position(5)
    resumed = list(build_dataloader(a, start_epoch=epoch, start_step=step, num_batches=5, num_workers=1))
    assert (epoch, step) == (0, 5) and all(_same(x, y) for x, y in zip(in_process[5:], resumed))
    assert a.position(7) == (1, 0)


def test_step_sampler():
    s = StepSampler(3, start_epoch=1, start_step=2, num_batches=4)
    assert list(s) == [(1, 2), (2, 0), (2, 1), (2, 2)] and len(s) == 4
    with pytest.raises(ValueError, match="start_step 3 out of range"):
        StepSampler(3, start_step=3)


def test_dataset_keys_strip_compression_and_jsonl_suffixes():
    from denselm.data.dataset import dataset_keys

    assert "api" in dataset_keys("/data/api.jsonl.gz", "/data")
    assert "api.jsonl" in dataset_keys("/data/api.jsonl.gz", "/data")
    assert "beta" in dataset_keys("/data/beta.jsonl", "/data")


def test_dataset_smaller_than_a_batch_is_named_in_a_warning(tok, tmp_path, caplog):
    write_jsonl(tmp_path / "d" / "big.jsonl", numbered_rows("big", 12, num_neg=3))
    write_jsonl(tmp_path / "d" / "tiny.jsonl", numbered_rows("tiny", 3, num_neg=3))
    with caplog.at_level("WARNING", logger="denselm.data.dataset"):
        ds = TrainDataset(_cfg(tmp_path / "d", dataset_weights={"tiny": 2.0}), tok, per_device_batch_size=4)
    assert [i.batches_per_epoch for i in ds.datasets] == [3, 0]
    assert "tiny.jsonl: 3 examples make no complete batch of 4 queries" in caplog.text
    assert "big.jsonl" not in caplog.text
