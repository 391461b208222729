"""Encoding defaults per device and dtype (inference.encode_defaults) and the fused RMSNorm:
whatever path the defaults pick, the embeddings are the seed's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from denselm import BiEncoderModel
from denselm.inference import Encoder, cpu_row_tokens, encode_defaults
from denselm.model.speedups import fused_norm
from tests.data_helpers import make_tokenizer
from tests.seed_reference import SeedBiEncoder
from tests.tiny_models import random_batch, tiny_backbone, tiny_config


def test_cpu_defaults_pack_in_small_rows():
    cfg = tiny_config("llama", hidden=576)  # intermediate 1152
    cfg.intermediate_size = 1536  # SmolLM2-135M's width
    assert encode_defaults("cpu", torch.bfloat16, cfg) == {
        "packing": True, "batch_size": 64, "max_tokens": 16384, "packing_max_tokens": 2048}
    assert cpu_row_tokens(cfg, torch.float32) == 1024
    cfg.intermediate_size = 14336  # Mistral-7B: the floor
    assert cpu_row_tokens(cfg, torch.float32) == 512
    assert encode_defaults("cuda", torch.bfloat16, cfg)["packing"] is False


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("position_ids", ["end_aligned", "from_zero"])
def test_default_encoder_matches_seed(arch, position_ids):
    """The CPU default (packed, small rows) gives the seed's embeddings: fp32 within 1e-5."""
    backbone = tiny_backbone(arch, dtype=torch.float64)
    batch, seqs = random_batch(11, 3, 40, seed=3, padding_side="left")
    seed = SeedBiEncoder(backbone, normlized=True, temperature=0.02)
    model = BiEncoderModel(model=backbone, tokenizer=None, normalized=True, position_ids=position_ids).eval()
    enc = Encoder(model, make_tokenizer(), packing_max_tokens=64)  # rows of <= 64 tokens: several rows
    assert enc.packing_settings() == (True, 64)
    assert not model.packing  # the encoder switches it for its own calls only
    with torch.no_grad():
        want = seed.encode(batch)
    got = torch.as_tensor(enc.encode_ids(seqs), dtype=torch.float64)
    assert not model.packing
    assert (got - want.float().double()).abs().max() < 1e-5
    padded = torch.as_tensor(Encoder(model, make_tokenizer(), packing=False).encode_ids(seqs), dtype=torch.float64)
    assert (padded - got).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_is_exact(dtype):
    """F.rms_norm computes transformers' Llama RMSNorm bit for bit (same rounding points)."""
    backbone = tiny_backbone("llama", dtype=dtype)
    norms = fused_norm.norms(backbone)
    assert len(norms) == 2 * 2 + 1  # two per layer, the final one
    for m in norms:
        m.weight.data.normal_()
    batch, _ = random_batch(5, 3, 20, seed=1, padding_side="right")
    with torch.no_grad():
        plain = backbone(**batch).last_hidden_state
        with fused_norm.fused_norms(backbone):
            assert all("forward" in vars(m) for m in norms)
            fused = backbone(**batch).last_hidden_state
    assert all("forward" not in vars(m) for m in norms)  # restored
    assert torch.equal(plain, fused)


def test_fused_norm_not_under_grad():
    backbone = tiny_backbone("llama")
    with fused_norm.fused_norms(backbone):
        assert all("forward" not in vars(m) for m in fused_norm.norms(backbone))


def test_auto_dtype(monkeypatch):
    from denselm import inference

    assert inference.auto_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_bf16_matmul", lambda: True)
    assert inference.auto_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_bf16_matmul", lambda: False)
    assert inference.auto_dtype("cpu") == torch.float32
