"""The speed-ups as one pipeline: the combination table, its validation, and scopes that restore the model."""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from denselm import BiEncoderModel
from denselm.config import load_config
from denselm.errors import ConfigError
from denselm.model import speedups
from denselm.model.backbone import apply_lora, decoder_layers
from denselm.model.speedups import packing
from denselm.model.speedups.common import SharedSwitch, swapped, swapped_forwards
from denselm.model.speedups.pooled_only import full_last_block, last_mlp_only_at, pooled_positions

from equivalence import flat_grads, rel_err
from tiny_models import random_batch, tiny_backbone

README = Path(__file__).resolve().parents[1] / "README.md"

# A config where every rule holds; each case below breaks exactly one rule.
VALID = ["--train.cache_frozen_layers", "true", "--model.lora.top_layers", "1", "--model.position_ids", "from_zero"]
INVALID = {
    "model.lora.top_layers": ["--model.lora.top_layers", "null"],
    "model.lora.enabled": ["--model.lora.enabled", "false"],
    "model.position_ids": ["--model.position_ids", "end_aligned"],
    "train.strategy": ["--train.strategy", "fsdp"],
}


def rule_id(rule: speedups.Rule) -> str:
    return rule.excludes[0] if rule.excludes else rule.needs[0][0]


# ------------------------------------------------------------------ the table
def test_table_covers_every_pair_and_every_invalid_cell_has_its_rule():
    keys = [s.key for s in speedups.SPEEDUPS + speedups.OTHER_SETTINGS]
    for i, a in enumerate(s.key for s in speedups.SPEEDUPS):
        for b in keys[i + 1:]:
            cell = speedups.combination(a, b)
            assert cell.valid or cell.rule in speedups.RULES, (a, b)
    assert len(speedups.COMBINATIONS) == sum(len(keys) - 1 - i for i in range(len(speedups.SPEEDUPS)))


def test_table_has_a_column_for_every_pooling_kind_and_position_policy():
    """A new pooling kind or position policy cannot be added without its row of verdicts."""
    from denselm.model.encoder import POSITION_POLICIES
    from denselm.model.pooling import POOLING_METHODS

    assert {s.key for s in speedups.OTHER_SETTINGS} == set(POOLING_METHODS) | set(POSITION_POLICIES)


def test_every_rule_has_a_test_case():
    assert sorted(rule_id(r) for r in speedups.RULES) == sorted(INVALID)


def test_valid_config_passes():
    cfg = load_config(None, VALID)
    assert cfg.train.cache_frozen_layers and cfg.model.position_ids == "from_zero"
    # packing makes end_aligned positions from_zero, so the cache is valid with it too
    cfg = load_config(None, VALID + ["--model.position_ids", "end_aligned", "--model.packing", "true"])
    assert cfg.model.packing


@pytest.mark.parametrize("rule", speedups.RULES, ids=rule_id)
def test_every_invalid_pair_names_both_flags(rule):
    with pytest.raises(ConfigError) as info:
        load_config(None, VALID + INVALID[rule_id(rule)])
    message = str(info.value)
    assert message == rule.message()
    for key in rule.keys():  # the flag that asks, and the one (or ones) it conflicts with
        assert key in message


def test_library_call_is_checked_by_the_same_rule():
    backbone = apply_lora(tiny_backbone(layers=4), r=4, alpha=8, dropout=0.0, target_modules="all-linear", top_layers=2)
    model = BiEncoderModel(model=backbone, normalized=True)  # end_aligned
    with pytest.raises(ConfigError, match=re.escape(speedups.FROM_ZERO_RULE.message())):
        model.enable_prefix_cache(num_frozen=2)


def test_readme_table_is_the_rendered_one():
    text = README.read_text()
    start, end = "<!-- speedups-table:start -->\n", "\n<!-- speedups-table:end -->"
    assert start in text and end in text
    assert text.split(start, 1)[1].split(end, 1)[0] == speedups.render_table()


# ------------------------------------------------------------------ scopes
class Box(nn.Module):
    def forward(self, x):
        return x + 1


def test_swapped_restores_on_exit_and_on_exception():
    box = Box()
    with swapped_forwards({box: lambda x: x * 10}):
        assert box(torch.tensor(2.0)) == 20
    assert "forward" not in vars(box) and box(torch.tensor(2.0)) == 3
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_forwards({box: lambda x: x * 10}):
            raise RuntimeError("boom")
    assert "forward" not in vars(box)
    # an instance attribute gets its old value back, a property goes back through its setter
    box.note = "old"
    with pytest.raises(KeyError):
        with swapped(box, "note", "new"):
            assert box.note == "new"
            raise KeyError
    assert box.note == "old"
    config = tiny_backbone("llama").config
    with swapped(config, "_attn_implementation", "eager"):
        assert config._attn_implementation == "eager"
    assert config._attn_implementation == "sdpa"


def test_shared_switch_restores_when_the_last_scope_leaves():
    log = []
    switch = SharedSwitch(lambda key: log.append("on") or (lambda: log.append("off")))
    key = object()
    with switch.scope(key):
        with switch.scope(key):
            assert log == ["on"]
        assert log == ["on"] and switch.held(key)
    assert log == ["on", "off"] and not switch.held(key)


def config_state(backbone) -> dict:
    return copy.deepcopy(vars(packing._config(backbone)))


def test_packing_scope_restores_the_config_also_on_exception():
    backbone = tiny_backbone("llama", dtype=torch.float32).eval()
    before = config_state(backbone)
    with packing.attention_scope(backbone):
        assert packing.config_attn_implementation(backbone) == packing.ATTN_IMPLEMENTATION
    assert config_state(backbone) == before
    with pytest.raises(RuntimeError, match="boom"):
        with packing.attention_scope(backbone):
            raise RuntimeError("boom")
    assert config_state(backbone) == before
    assert packing.config_attn_implementation(backbone) == "sdpa"


def spy_packed_attention(calls: list):
    """Register a recording wrapper of the packed kernel; returns the function that undoes it."""
    from transformers import AttentionInterface

    def spy(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q") is not None)
        return packing.packed_attention(*args, **kwargs)

    AttentionInterface.register(packing.ATTN_IMPLEMENTATION, spy)
    return packing.register_attention


def test_packed_encoding_leaves_the_config_as_it_was():
    backbone = tiny_backbone("qwen2", dtype=torch.float32).eval()
    feats, _ = random_batch(6, 3, 20, seed=1)
    before = config_state(backbone)
    calls: list[bool] = []
    undo = spy_packed_attention(calls)
    try:
        with torch.no_grad():
            packing.encode_features(backbone, feats, "last", max_tokens=30)
    finally:
        undo()
    assert calls and all(calls)  # the packed kernel ran, on packed rows
    assert config_state(backbone) == before
    # a failing packed forward (an empty row) leaves it as it was too
    feats["attention_mask"][0] = 0
    with pytest.raises(ValueError, match="no real token"), torch.no_grad():
        packing.encode_features(backbone, feats, "last")
    assert config_state(backbone) == before


def test_checkpointing_recompute_runs_the_packed_kernel_after_the_scope():
    """Backward replays checkpointed blocks after the packed forward's scope has ended; the
    replay must still see the packed kernel (else attention crosses sequences), and the config
    is as before once backward is done."""
    base = tiny_backbone("llama", dtype=torch.float64)
    query, _ = random_batch(3, 3, 9, seed=2, padding_side="right")
    passage, _ = random_batch(6, 4, 14, seed=3, padding_side="right")

    def run(packed: bool, calls: list | None = None):
        backbone = copy.deepcopy(base)
        model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05, position_ids="from_zero",
                               packing=packed, packing_max_tokens=24)
        model.gradient_checkpointing_enable()
        model.train()
        before = config_state(backbone)
        undo = spy_packed_attention(calls) if calls is not None else None
        try:
            out = model(query=query, passage=passage)
            if calls is not None:
                calls.append("backward")
            out.loss.backward()
        finally:
            if undo is not None:
                undo()
        assert config_state(backbone) == before
        return out.loss.detach(), flat_grads(backbone)

    calls: list = []
    packed = run(True, calls)
    after_forward = calls[calls.index("backward") + 1:]
    assert calls.index("backward") > 0 and after_forward and all(after_forward)  # the recompute: packed kernel
    ref = run(False)
    assert rel_err(packed[0], ref[0]) <= 1e-10
    assert rel_err(packed[1], ref[1]) <= 1e-10


def test_pooled_only_scope_restores_the_mlp_on_exception():
    backbone = tiny_backbone("llama", dtype=torch.float64).eval()
    mlp = decoder_layers(backbone)[-1].mlp
    feats, _ = random_batch(3, 2, 8, seed=4)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with last_mlp_only_at(backbone, pooled_positions(feats["attention_mask"], "last")):
            assert "forward" in vars(mlp)
            raise RuntimeError("boom")
    assert "forward" not in vars(mlp)


def test_prefix_cache_serving_restores_the_blocks_on_exception():
    backbone = apply_lora(tiny_backbone(layers=4, dtype=torch.float64), r=4, alpha=8, dropout=0.0,
                          target_modules="all-linear", top_layers=2)
    model = BiEncoderModel(model=backbone, normalized=True, position_ids="from_zero")
    cache = model.enable_prefix_cache(num_frozen=2)
    feats, _ = random_batch(3, 2, 8, seed=6)
    layers = decoder_layers(backbone)
    with pytest.raises(RuntimeError, match="boom"):
        with cache.serving(feats, packed=False):
            assert all("forward" in vars(layer) for layer in layers[:2])
            raise RuntimeError("boom")
    assert not any("forward" in vars(layer) for layer in layers)
    # computing the cached states swaps the blocks above the cut; they are whole again afterwards
    assert cache.misses == 3
    assert not any("forward" in vars(layer) for layer in layers)


# ------------------------------------------------------------------ pooled-only MLP in training
def _mlp_rows(backbone) -> tuple[list[int], Callable[[], None]]:
    """Rows each call of the last block's down projection sees (its input is the MLP's width)."""
    rows: list[int] = []
    handle = decoder_layers(backbone)[-1].mlp.down_proj.register_forward_hook(
        lambda module, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows, handle.remove


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "frozen-cache"])
def test_pooled_only_mlp_in_training_keeps_loss_and_gradients(packed, cached):
    """With gradients on, the last MLP runs at the pooled tokens only, and the loss and every
    gradient equal the full computation's (float64, padded and packed, with and without the
    frozen-layer cache below LoRA blocks)."""
    base = apply_lora(tiny_backbone(layers=4, dtype=torch.float64), r=4, alpha=8, dropout=0.0,
                      target_modules="all-linear", top_layers=2)
    query, _ = random_batch(3, 3, 9, seed=12, padding_side="right")
    passage, _ = random_batch(6, 4, 14, seed=13, padding_side="left")
    real_tokens = int(query["attention_mask"].sum() + passage["attention_mask"].sum())

    def run(full: bool):
        backbone = copy.deepcopy(base)
        model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05, position_ids="from_zero",
                               packing=packed, packing_max_tokens=24)
        if cached:
            model.enable_prefix_cache(num_frozen=2)
        model.train()
        rows, remove = _mlp_rows(backbone)
        try:
            with full_last_block() if full else contextlib.nullcontext():
                out = model(query=query, passage=passage)
                out.loss.backward()
        finally:
            remove()
        return out.loss.detach(), flat_grads(backbone), sum(rows)

    loss, grads, rows = run(full=False)
    ref_loss, ref_grads, ref_rows = run(full=True)
    assert rows == 3 + 6  # one row per text: its pooled (last) token
    assert ref_rows >= real_tokens  # padded: every position, pads too; packed: every real token
    assert rel_err(loss, ref_loss) <= 1e-12
    assert rel_err(grads, ref_grads) <= 1e-10


def test_pooled_only_mlp_is_off_for_a_checkpointed_last_block():
    """Checkpointing recomputes the block in backward, outside the scope: the MLP must run in full."""
    backbone = tiny_backbone("llama", dtype=torch.float64)
    model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05, position_ids="from_zero")
    model.gradient_checkpointing_enable()
    model.train()
    query, _ = random_batch(2, 2, 7, seed=14)
    passage, _ = random_batch(4, 3, 9, seed=15)
    rows, remove = _mlp_rows(backbone)
    try:
        model(query=query, passage=passage).loss.backward()
    finally:
        remove()
    assert rows[0] == query["input_ids"].numel()  # the forward at every position of the padded batch
    with torch.no_grad():  # encoding is never checkpointed: pooled rows only
        rows, remove = _mlp_rows(backbone)
        model.encode(query)
        remove()
    assert rows == [2]
