"""denselm.gradcache: chunking by rows and tokens, trimming, RNG replay, and the cached backward's gradients."""

from __future__ import annotations

import torch

from denselm.gradcache import RandState, backward_cached, encode_without_graph, split_features


def padded(lengths, side="right", T=None):
    T = T or max(lengths)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n:] = 1
    ids = torch.arange(len(lengths) * T).view(len(lengths), T) * mask
    return {"input_ids": ids, "attention_mask": mask}


def test_split_by_rows_and_tokens_keeps_order():
    feats = padded([5, 2, 2, 6, 1])
    chunks = split_features(feats, max_rows=2)
    assert [c["attention_mask"].shape[0] for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["input_ids"].sum(1) for c in chunks]), feats["input_ids"].sum(1))
    # token budget: rows x the chunk's longest row; a single row over budget still gets its own chunk
    by_tokens = split_features(feats, max_tokens=10)
    assert [tuple(c["attention_mask"].shape) for c in by_tokens] == [(2, 5), (1, 2), (1, 6), (1, 1)]


def test_chunks_are_trimmed_on_either_padding_side():
    for side in ("right", "left"):
        chunks = split_features(padded([2, 2, 6], side=side, T=8), max_rows=2)
        assert chunks[0]["attention_mask"].shape == (2, 2) and chunks[0]["attention_mask"].all()
        assert chunks[1]["attention_mask"].shape == (1, 6)


def test_rand_state_replays_dropout_masks():
    state = RandState.capture()
    first = torch.rand(4)
    with state.replay():
        assert torch.equal(torch.rand(4), first)
    outer = torch.get_rng_state()
    with state.replay():
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), outer)  # the surrounding stream is put back
    state2 = RandState.capture()
    with state2.replay():
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), a)  # replay restored the state it found


def test_cached_backward_equals_plain_backward():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    drop = torch.nn.Dropout(0.3)

    def encode(feats):  # (rows, T) ids -> (rows, 4): dropout makes the RNG replay matter
        x = torch.nn.functional.one_hot(feats["input_ids"] % 8, 8).double() * feats["attention_mask"][..., None]
        return drop(x.sum(1) @ weight)

    feats = padded([3, 1, 4, 2, 2])
    target = torch.randn(5, 4, dtype=torch.float64)
    chunks = split_features(feats, max_rows=2)
    torch.manual_seed(1)
    side = encode_without_graph(encode, chunks)
    loss = ((side.reps - target) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, side.reps)
    backward_cached(encode, [side], [grad])
    cached = weight.grad.clone()

    weight.grad = None
    torch.manual_seed(1)
    reps = torch.cat([encode(c) for c in chunks])
    ((reps - target) ** 2).sum().backward()
    torch.testing.assert_close(cached, weight.grad, rtol=0, atol=1e-12)
