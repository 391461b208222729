"""The frozen-prefix cache: training on cached bottom blocks equals training on the whole model."""

from __future__ import annotations

import pytest
import torch

from denselm import BiEncoderModel
from denselm.model.backbone import apply_lora

from equivalence import flat_grads, rel_err
from tiny_models import random_batch, tiny_backbone


def lora_model(arch="llama", dtype=torch.float64, layers=4, top=2, packing=False, checkpointing=False,
               trainable_token_ids=None, **kw):
    backbone = tiny_backbone(arch, dtype=dtype, layers=layers)
    backbone = apply_lora(backbone, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                          trainable_token_ids=trainable_token_ids, top_layers=top)
    torch.manual_seed(1)
    for name, p in backbone.named_parameters():
        if "lora_B" in name:  # non-zero B: the adapters change the output, so gradients are informative
            torch.nn.init.normal_(p, std=0.1)
    model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05, position_ids="from_zero",
                           packing=packing, **kw)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def step(model, query, passage, teacher=None):
    model.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage, teacher_scores=teacher)
    out.loss.backward()
    return out.loss.detach(), flat_grads(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("variant", ["plain", "packing", "checkpointing", "grad_cache"])
def test_cached_step_equals_full_step(arch, padding_side, variant):
    kw = {"packing": variant == "packing", "checkpointing": variant == "checkpointing"}
    if variant == "grad_cache":
        kw.update(grad_cache=True, grad_cache_chunk_size=3)
    full, cached = lora_model(arch, **kw), lora_model(arch, **kw)
    cache = cached.enable_prefix_cache(num_frozen=2)
    query, _ = random_batch(4, 3, 9, seed=1, padding_side=padding_side)
    passage, _ = random_batch(8, 4, 16, seed=2, padding_side=padding_side)
    teacher = torch.randn(4, 2, dtype=torch.float64)
    ref_loss, ref_grad = step(full, query, passage, teacher)
    for attempt in range(2):  # the first call computes the prefix, the second reads it back
        loss, grad = step(cached, query, passage, teacher)
        assert rel_err(loss, ref_loss) < 1e-12, attempt
        assert rel_err(grad, ref_grad) < 1e-10, attempt
    assert cache.misses == 12 and cache.hits >= 12
    assert cache.stats()["prefix_cache_texts"] == 12


def test_cache_hits_across_batches_with_other_padding():
    """A text is recognised by its real tokens whatever its batch, padding side or row."""
    model = lora_model()
    cache = model.enable_prefix_cache(num_frozen=2)
    batch, seqs = random_batch(6, 3, 12, seed=5, padding_side="left")
    with torch.no_grad():
        first = model.encode(batch)
    from denselm.data.tokenize import pad_batch

    reordered = pad_batch(list(reversed(seqs)), pad_id=0, padding_side="right")
    with torch.no_grad():
        second = model.encode(reordered)
    assert cache.misses == 6 and cache.hits == 6
    torch.testing.assert_close(second, first.flip(0), rtol=0, atol=1e-12)


def test_rejects_trainable_blocks_below_the_cut():
    model = lora_model(top=2)
    with pytest.raises(ValueError, match="lies in a cached"):
        model.enable_prefix_cache(num_frozen=3)


def test_rejects_trainable_embedding_rows():
    model = lora_model(trainable_token_ids=[5])
    with pytest.raises(ValueError, match="embeddings"):
        model.enable_prefix_cache(num_frozen=2)


def test_rejects_batch_dependent_positions():
    backbone = apply_lora(tiny_backbone(layers=4), r=4, alpha=8, dropout=0.0, target_modules="all-linear", top_layers=2)
    model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05)  # end_aligned (the seed's)
    with pytest.raises(ValueError, match="from_zero"):
        model.enable_prefix_cache(num_frozen=2)


def test_memory_bound_keeps_results_exact():
    full, cached = lora_model(), lora_model()
    cache = cached.enable_prefix_cache(num_frozen=2, max_bytes=1)  # nothing fits: computed every time
    query, _ = random_batch(4, 3, 9, seed=1)
    passage, _ = random_batch(8, 4, 16, seed=2)
    ref_loss, ref_grad = step(full, query, passage)
    loss, grad = step(cached, query, passage)
    assert rel_err(grad, ref_grad) < 1e-10 and rel_err(loss, ref_loss) < 1e-12
    assert cache.stats()["prefix_cache_texts"] == 0


def test_model_runs_whole_after_serving():
    """The swapped forwards are restored: outside the cache the model computes every block."""
    model = lora_model()
    batch, _ = random_batch(3, 3, 8, seed=9)
    with torch.no_grad():
        before = model.encode(batch)
    model.enable_prefix_cache(num_frozen=2)
    with torch.no_grad():
        model.encode(batch)
    model.prefix_cache = None
    with torch.no_grad():
        after = model.encode(batch)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("max_tokens", [None, 10, 4096], ids=["one-row", "many-rows", "default"])
def test_first_sight_of_a_packing_model_is_computed_packed(monkeypatch, max_tokens):
    """A packing model's cache computes new texts in packed rows (no padded forward of the frozen
    blocks), and stores the states the padded computation gives."""
    from denselm.model.speedups import packing

    padded_model = lora_model()
    padded_cache = padded_model.enable_prefix_cache(num_frozen=2)
    model = lora_model(packing=True, packing_max_tokens=max_tokens)
    cache = model.enable_prefix_cache(num_frozen=2)
    calls = []
    real_forward_packed = packing.forward_packed
    monkeypatch.setattr(packing, "forward_packed", lambda b, row: calls.append(row.num_sequences) or real_forward_packed(b, row))
    batch, _ = random_batch(7, 3, 12, seed=8, padding_side="left")
    ours = cache.lookup(batch["input_ids"], batch["attention_mask"], packed=True, max_tokens=max_tokens)
    first_sight = len(calls)
    assert first_sight >= 1 and sum(calls) == 7
    if max_tokens == 10:
        assert first_sight > 1
    ref = padded_cache.lookup(batch["input_ids"], batch["attention_mask"])
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-12
    # and a training step of the packing model through its cache equals the whole model's
    full = lora_model(packing=True, packing_max_tokens=max_tokens)
    query, _ = random_batch(4, 3, 9, seed=1, padding_side="right")
    passage, _ = random_batch(8, 4, 16, seed=2, padding_side="right")
    ref_loss, ref_grad = step(full, query, passage)
    loss, grad = step(model, query, passage)
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(grad, ref_grad) < 1e-10
