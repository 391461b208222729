"""LoRA updates added in place (speedups/lora_add.py): peft's numbers, bit for bit, and peft's own
forward wherever the in-place path does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from denselm import BiEncoderModel
from denselm.model.speedups.lora_add import _plain_adapter, fast_lora, lora_layers
from equivalence import flat_grads
from tiny_models import random_batch, tiny_backbone


def lora_model(r=4, alpha=8, dtype=torch.bfloat16, **kw):
    """bf16 frozen weights, float32 adapters (peft's autocast_adapter_dtype), nonzero B."""
    from peft import LoraConfig, get_peft_model

    base = tiny_backbone("llama", dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                            init_lora_weights=False, **kw))
    return model


def step(backbone, packing: bool):
    query, _ = random_batch(3, 4, 12, seed=1, padding_side="right")
    passage, _ = random_batch(6, 4, 20, seed=2, padding_side="right")
    model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05, packing=packing,
                           position_ids="from_zero")
    model.train()
    backbone.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage)
    out.loss.backward()
    return out.loss.detach(), torch.cat([out.q_reps.detach(), out.p_reps.detach()]), flat_grads(backbone)


def peft_only(monkeypatch):
    """The encoder without the in-place path: every LoRA layer runs peft's forward."""
    import contextlib

    from denselm.model import encoder

    monkeypatch.setattr(encoder, "fast_lora", lambda backbone: contextlib.nullcontext())


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_bf16_weights_fp32_adapters_bit_identical_to_peft(monkeypatch, packing):
    model = lora_model()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ours = step(copy.deepcopy(model), packing)
    peft_only(monkeypatch)
    ref = step(model, packing)
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1], ref[1])
    assert torch.equal(ours[2], ref[2])
    assert ref[2].abs().sum() > 0


def test_scaling_not_a_power_of_two_agrees_to_float32_rounding(monkeypatch):
    model = lora_model(r=4, alpha=6, dtype=torch.float32)  # scaling 1.5
    ours = step(copy.deepcopy(model), packing=True)
    peft_only(monkeypatch)
    ref = step(model, packing=True)
    assert (ours[0] - ref[0]).abs() <= 1e-6 * ref[0].abs()
    assert ((ours[2] - ref[2]).norm() / ref[2].norm()) <= 1e-5


def layer_output(module, x):
    with fast_lora(module):
        return module(x)


def test_falls_back_to_peft_where_the_in_place_path_does_not_apply():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    cases = {
        "dropout": lora_model(lora_dropout=0.1),
        "dora": lora_model(use_dora=True),
    }
    for name, model in cases.items():
        model.eval()
        layer = lora_layers(model)[0]
        assert _plain_adapter(layer) is None, name
        with torch.no_grad():
            assert torch.equal(layer_output(layer, x), type(layer).forward(layer, x)), name

    model = lora_model()
    layer = lora_layers(model)[0]
    assert _plain_adapter(layer) == "default"
    with torch.no_grad():
        with model.disable_adapter():
            assert _plain_adapter(layer) is None
            assert torch.equal(layer_output(layer, x), layer.base_layer(x))
        layer.merge()
        assert _plain_adapter(layer) is None
        assert torch.equal(layer_output(layer, x), layer.base_layer(x))
        layer.unmerge()
    assert _plain_adapter(layer) == "default"


def test_scope_restores_the_class_forward_also_on_exception():
    model = lora_model()
    layers = lora_layers(model)
    assert layers and all("forward" not in vars(m) for m in layers)
    with pytest.raises(RuntimeError):
        with fast_lora(model):
            assert all("forward" in vars(m) for m in layers)
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in layers)


def test_plain_model_has_no_lora_layers():
    backbone = tiny_backbone("llama")
    assert lora_layers(backbone) == []
    with fast_lora(backbone):
        assert "forward" not in vars(backbone)
