"""The last block's MLP at the pooled tokens only gives the same embeddings as the full last block."""

from __future__ import annotations


import pytest
import torch

from denselm import BiEncoderModel
from denselm.model.backbone import decoder_layers
from denselm.model.speedups.pooled_only import full_last_block

from tiny_models import random_batch, tiny_backbone


def mlp_rows(model) -> list[tuple[int, ...]]:
    """Record the leading shape of every call of the last block's MLP (at its output projection)."""
    seen: list[tuple[int, ...]] = []
    mlp = decoder_layers(model.model)[-1].mlp
    mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:-1])))
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["last", "first"])
@pytest.mark.parametrize("packing", [False, True])
def test_shortcut_matches_the_full_last_block(arch, padding_side, pooling, packing):
    model = BiEncoderModel(model=tiny_backbone(arch, dtype=torch.float64, layers=3), normalized=True,
                           pooling=pooling, position_ids="from_zero", packing=packing)
    batch, _ = random_batch(6, 2, 15, seed=3, padding_side=padding_side)
    seen = mlp_rows(model)
    with full_last_block(), torch.no_grad():  # the reference: the whole last block
        full = model.encode(batch)
    with torch.no_grad():
        fast = model.encode(batch)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-12)
    # the full pass fed every token to the MLP, the shortcut one row per sequence
    total = int(batch["attention_mask"].sum())
    assert seen[0] in ((6, batch["input_ids"].shape[1]), (1, total))
    assert seen[1] == (6,)


def test_mean_pooling_keeps_the_whole_block():
    model = BiEncoderModel(model=tiny_backbone("llama", dtype=torch.float64), normalized=True, pooling="mean")
    batch, _ = random_batch(4, 2, 9, seed=4)
    seen = mlp_rows(model)
    with torch.no_grad():
        model.encode(batch)
    assert seen == [tuple(batch["input_ids"].shape)]


def test_backbone_is_whole_again_after_encoding():
    model = BiEncoderModel(model=tiny_backbone("llama", dtype=torch.float64), normalized=True)
    batch, _ = random_batch(4, 2, 9, seed=5)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        before = model.model(**kwargs).last_hidden_state
        model.encode(batch)
        after = model.model(**kwargs).last_hidden_state
    assert "forward" not in decoder_layers(model.model)[-1].mlp.__dict__
    torch.testing.assert_close(after, before, rtol=0, atol=0)
