"""Padding-free encoding: packing by hand, and packed == padded (embeddings, losses, gradients)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denselm import BiEncoderModel
from denselm.model.speedups import packing
from denselm.model.pooling import pool, pool_packed
from equivalence import flat_grads, rel_err, tol
from tiny_models import random_batch, tiny_backbone

B, G = 3, 4


# ------------------------------------------------------------------ by hand
def test_pack_left_and_right_padding_by_hand():
    left = {"input_ids": torch.tensor([[0, 0, 5, 6, 2], [7, 8, 9, 10, 2]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    right = {"input_ids": torch.tensor([[5, 6, 2, 0, 0], [7, 8, 9, 10, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    for feats in (left, right):
        p = packing.pack(feats)
        assert p.input_ids.tolist() == [[5, 6, 2, 7, 8, 9, 10, 2]]
        assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
        assert p.cu_seqlens.tolist() == [0, 3, 8] and p.cu_seqlens.dtype == torch.int32
        assert p.max_seqlen == 5 and p.num_sequences == 2 and p.num_tokens == 8
        assert [t.tolist() for t in packing.unpack(p.input_ids, p.cu_seqlens)] == [[5, 6, 2], [7, 8, 9, 10, 2]]


def test_pack_sequences_and_pool_packed_by_hand():
    p = packing.pack_sequences([torch.tensor([4, 2]), torch.tensor([9]), torch.tensor([3, 3, 2])])
    assert p.position_ids.tolist() == [[0, 1, 0, 0, 1, 2]]
    hidden = torch.arange(6.0).reshape(1, 6, 1)  # token t has hidden value t
    assert pool_packed(hidden, p.cu_seqlens, "last").flatten().tolist() == [1.0, 2.0, 5.0]
    assert pool_packed(hidden, p.cu_seqlens, "first").flatten().tolist() == [0.0, 2.0, 3.0]
    assert pool_packed(hidden, p.cu_seqlens, "mean").flatten().tolist() == [0.5, 2.0, 4.0]


def test_row_spans_bound_real_tokens():
    assert packing.row_spans([3, 5, 2, 6], 8) == [(0, 2), (2, 4)]
    # A sequence longer than the budget gets a row of its own, never split.
    assert packing.row_spans([3, 5, 2, 6], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert packing.row_spans([3, 5, 2, 6], None) == [(0, 4)]
    feats, seqs = random_batch(9, 3, 12, seed=3)
    rows = packing.pack_rows(feats, max_tokens=20)
    assert len(rows) > 1
    assert all(r.num_tokens <= 20 for r in rows)
    assert torch.cat([r.input_ids[0] for r in rows]).tolist() == [t for s in seqs for t in s]


def test_empty_row_is_an_error():
    feats = {"input_ids": torch.tensor([[0, 0], [5, 2]]), "attention_mask": torch.tensor([[0, 0], [1, 1]])}
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        packing.pack(feats)


# -------------------------------------------------- embeddings, backbone level
def padded_reference(backbone, feats, method="last"):
    mask = feats["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # the "from_zero" policy
    hidden = backbone(**feats, position_ids=positions, use_cache=False).last_hidden_state
    return pool(hidden, mask, method)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_embeddings_equal_padded_fp32(arch, padding_side):
    backbone = tiny_backbone(arch, dtype=torch.float32).eval()
    feats, _ = random_batch(9, 3, 24, seed=7, padding_side=padding_side)
    with torch.no_grad():
        ref = padded_reference(backbone, feats)
        packed = packing.encode_features(backbone, feats, "last", max_tokens=40)  # several rows
    assert packing.attn_implementation(backbone) == packing.ATTN_IMPLEMENTATION
    assert F.cosine_similarity(packed, ref, dim=-1).min() >= 0.9999
    assert rel_err(packed, ref) <= tol(torch.float32)
    # The same row through plain causal attention (crossing sequence boundaries) is far off:
    # the equality above is the packed kernel's doing.
    backbone.config._attn_implementation = "sdpa"
    p = packing.pack(feats)
    with torch.no_grad():
        crossed = pool_packed(backbone(input_ids=p.input_ids, position_ids=p.position_ids,
                                       attention_mask=torch.ones_like(p.input_ids)).last_hidden_state, p.cu_seqlens)
    assert rel_err(crossed, ref) > 0.05


@pytest.mark.parametrize("method", ["mean", "first"])
def test_packed_mean_and_first_pooling(method):
    backbone = tiny_backbone("qwen2", dtype=torch.float64).eval()
    feats, _ = random_batch(5, 2, 15, seed=2, padding_side="right")
    with torch.no_grad():
        assert rel_err(packing.encode_features(backbone, feats, method), padded_reference(backbone, feats, method)) <= 1e-10


def test_eager_backbone_uses_transformers_block_diagonal_mask():
    """Backbones not on SDPA keep their kernel; transformers masks by the position-id resets."""
    from transformers import AutoModel

    from tiny_models import tiny_config

    torch.manual_seed(0)
    # float32: eager attention takes its softmax in float32 whatever the model's dtype.
    backbone = AutoModel.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    feats, _ = random_batch(6, 2, 16, seed=4, padding_side="right")  # left: eager NaNs at pads
    with torch.no_grad():
        packed = packing.encode_features(backbone, feats, "last", max_tokens=30)
        ref = padded_reference(backbone, feats)
    assert packing.attn_implementation(backbone) == "eager"
    assert rel_err(packed, ref) <= tol(torch.float32)


# ----------------------------------------------- losses and gradients, model level
def make_inputs(padding_side, seed=0):
    query, _ = random_batch(B, 3, 9, seed=seed, padding_side=padding_side)
    passage, _ = random_batch(B * G, 4, 16, seed=seed + 1, padding_side=padding_side)
    teacher = torch.randn(B * G, generator=torch.Generator().manual_seed(seed + 2)).tolist()
    return query, passage, teacher


def step(backbone, query, passage, mode="normal", teacher=None, **kw):
    model = BiEncoderModel(model=backbone, tokenizer=None, normalized=True, temperature=0.05, **kw)
    model.train()
    backbone.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage, messages=[mode], teacher_scores=teacher)
    out.loss.backward()
    return out.loss.detach(), torch.cat([out.q_reps.detach(), out.p_reps.detach()]), flat_grads(backbone)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("extra", [{}, {"grad_cache": True, "grad_cache_chunk_size": 5},
                                   {"grad_cache": True, "grad_cache_max_tokens": 40}, {"sub_batch_size": 4}],
                         ids=["plain", "gradcache-rows", "gradcache-tokens", "sub-batch"])
def test_packed_step_equals_padded_fp32(arch, padding_side, extra):
    backbone = tiny_backbone(arch, dtype=torch.float32)
    query, passage, teacher = make_inputs(padding_side)
    ref = step(copy.deepcopy(backbone), query, passage, teacher=teacher, position_ids="from_zero")
    ours = step(backbone, query, passage, teacher=teacher, packing=True, packing_max_tokens=32, **extra)
    assert F.cosine_similarity(ours[1], ref[1], dim=-1).min() >= 0.9999
    assert rel_err(ours[0], ref[0]) <= tol(torch.float32)
    assert rel_err(ours[2], ref[2]) <= tol(torch.float32)
    assert ours[2].abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["normal", "custom"])
def test_packed_step_equals_seed_positions_fp32(arch, mode):
    """Against the default (seed, end-aligned positions) padded path: RoPE sees only relative
    positions, so from-zero packed positions give the seed's loss and gradients too.  (Not to
    1e-10 in float64: transformers builds the rotary tables in float32, so shifting every
    position changes their rounding, about 1e-8.)"""
    backbone = tiny_backbone(arch, dtype=torch.float32)
    query, passage, teacher = make_inputs("left", seed=3)
    teacher = teacher if mode == "normal" else None
    ref = step(copy.deepcopy(backbone), query, passage, mode, teacher)
    ours = step(backbone, query, passage, mode, teacher, packing=True, grad_cache=True, grad_cache_chunk_size=4)
    assert rel_err(ours[0], ref[0]) <= tol(torch.float32)
    assert rel_err(ours[2], ref[2]) <= tol(torch.float32)


def test_packing_implies_from_zero_positions(float64_backbone):
    model = BiEncoderModel(model=float64_backbone, normalized=True, packing=True)
    assert model.position_policy == "from_zero"
    assert model.settings()["position_ids"] == "from_zero"


def test_packed_lora_gradient_checkpointing_grad_cache():
    from peft import LoraConfig, get_peft_model

    base = tiny_backbone("qwen2", dtype=torch.float64)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    query, passage, _ = make_inputs("right", seed=5)
    ref = step(copy.deepcopy(lora), query, passage, position_ids="from_zero")
    model = BiEncoderModel(model=lora, normalized=True, temperature=0.05, packing=True, packing_max_tokens=24,
                           grad_cache=True, grad_cache_chunk_size=4)
    model.gradient_checkpointing_enable()
    model.train()
    lora.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage, messages=["normal"])
    out.loss.backward()
    assert packing.attn_implementation(lora) == packing.ATTN_IMPLEMENTATION
    assert rel_err(out.loss.detach(), ref[0]) <= 1e-10
    assert rel_err(flat_grads(lora), ref[2]) <= 1e-10


def test_inference_encoder_packs_when_the_model_does():
    from data_helpers import make_tokenizer
    from denselm.inference import Encoder

    backbone = tiny_backbone("llama", dtype=torch.float32)
    _, seqs = random_batch(11, 2, 30, seed=9)
    plain = Encoder(BiEncoderModel(model=copy.deepcopy(backbone), normalized=True, position_ids="from_zero"),
                    tokenizer=make_tokenizer(), batch_size=4)
    packed_model = BiEncoderModel(model=backbone, normalized=True, packing=True, packing_max_tokens=48)
    packed = Encoder(packed_model, tokenizer=make_tokenizer(), batch_size=4)
    calls = []
    real = packing.encode_packed
    packing.encode_packed = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        a, b = plain.encode_ids(seqs), packed.encode_ids(seqs)
    finally:
        packing.encode_packed = real
    assert calls, "the packed model must encode packed rows"
    assert np.min(np.sum(a * b, axis=1)) >= 0.9999  # normalised: cosine


def test_sliding_window_config_builds_no_row_mask():
    """Mistral-style sliding window shorter than a packed row but longer than each sequence:
    same embeddings as padded, and no (total x total) mask is built for the packed rows."""
    from transformers import AutoModel, MistralConfig

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=24, pad_token_id=0)
    torch.manual_seed(0)
    backbone = AutoModel.from_config(cfg, attn_implementation="sdpa").double().eval()
    feats, _ = random_batch(6, 4, 20, seed=11, padding_side="right")
    with torch.no_grad():
        ref = padded_reference(backbone, feats)
        built = []
        real_mask = packing.packed_mask
        packing.enable(backbone)
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(packing.ATTN_IMPLEMENTATION,
                                        lambda *a, **k: built.append(packing._state.packed) or real_mask(*a, **k))
        try:
            out = packing.encode_features(backbone, feats, "last", max_tokens=64)
        finally:
            packing.register_attention()
    assert built and all(built)  # every mask request came from a packed forward, and got None
    assert rel_err(out, ref) <= 1e-10
    long_feats, _ = random_batch(2, 30, 30, seed=1)
    with pytest.raises(ValueError, match="sliding window"):
        packing.encode_features(backbone, long_feats, "last")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_uses_variable_length_flash_kernel():
    backbone = tiny_backbone("qwen2", dtype=torch.bfloat16).cuda().eval()
    feats, _ = random_batch(9, 3, 40, seed=7, padding_side="left")
    feats = {k: v.cuda() for k, v in feats.items()}
    with torch.no_grad():
        ref = padded_reference(backbone, feats).float()
        out = packing.encode_features(backbone, feats, "last", max_tokens=100).float()
    assert packing._varlen_kernel() is not None and not packing._varlen_failed
    assert F.cosine_similarity(out, ref, dim=-1).min() >= 0.99  # bf16


# ------------------------------------------------------------------ float32 attention in CPU training
def packed_qkv(lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, 16, generator=g).to(dtype).requires_grad_() for h in (4, 2, 2))
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return q, k, v, cu


def per_sequence(q, k, v, lengths):
    """(1, H, T, d) -> (T, H, d): causal SDPA on each sequence alone, in the inputs' dtype."""
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True,
                                                   enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16_training_attention_runs_in_float32_on_cpus_without_amx(monkeypatch, training):
    monkeypatch.setattr(packing, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    block = torch.nn.Linear(2, 2).train(training)  # the attention module: trainable weights
    lengths = [5, 1, 9, 3]
    q, k, v, cu = packed_qkv(lengths, torch.bfloat16)
    assert packing.float32_attention(block, q) is training
    out, _ = packing.packed_attention(block, q, k, v, None, cu_seq_lens_q=cu)
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 4, 16)
    if training:  # float32 attention on the bf16 inputs, rounded once
        ref = per_sequence(q.float(), k.float(), v.float(), lengths).to(torch.bfloat16)
    else:
        ref = per_sequence(q, k, v, lengths)
    assert torch.equal(out[0], ref)
    if training:  # and its gradient is the float32 attention's, rounded to bf16 (the copies' backward)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        out.backward(upstream)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        per_sequence(q32, k32, v32, lengths).backward(upstream[0].float())
        for ours, exact in ((q, q32), (k, k32), (v, v32)):
            assert torch.equal(ours.grad, exact.grad.to(torch.bfloat16))


def test_float32_attention_only_where_it_was_measured(monkeypatch):
    q = torch.zeros(1, 4, 3, 16, dtype=torch.bfloat16)
    block = torch.nn.Linear(2, 2).train()
    monkeypatch.setattr(packing, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert packing.float32_attention(block, q)
    assert not packing.float32_attention(block, q.float())  # float32 inputs: nothing to change
    frozen = torch.nn.Linear(2, 2).train().requires_grad_(False)
    assert not packing.float32_attention(frozen, q)  # frozen block: forward only, bf16 is faster
    monkeypatch.setattr(packing, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert not packing.float32_attention(block, q)  # AMX: not measured, bf16 kept


def test_packed_attention_backward_sums_no_row_sized_zeros():
    """Each sequence's view comes from one split, so the backward adds no (1, H, T, d) zero
    tensor per sequence (a slice's backward would: O(sequences x tokens) per layer)."""
    lengths = [3] * 40
    q, k, v, cu = packed_qkv(lengths, torch.float32)
    block = torch.nn.Linear(2, 2).eval()
    out, _ = packing.packed_attention(block, q, k, v, None, cu_seq_lens_q=cu)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::slice_backward", 0) == 0  # one per sequence and tensor with slicing
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    per_sequence(*ref, lengths).sum().backward()
    for ours, exact in zip((q, k, v), ref):
        assert torch.allclose(ours.grad, exact.grad, atol=1e-6)
