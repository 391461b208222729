"""denselm.model.backbone: finding and truncating blocks, LoRA on the top layers only, fp32 trainables."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_backbone

from denselm.errors import ConfigError
from denselm.model.backbone import apply_lora, decoder_layers, layer_attribute, trainable_to_fp32, truncate_layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_layers_and_truncation(arch):
    model = tiny_backbone(arch, layers=3)
    assert len(decoder_layers(model)) == 3 and layer_attribute(model) == "layers"
    truncate_layers(model, 2)
    assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="model.num_layers=5 but the model has only 2 layers"):
        truncate_layers(model, 5)


def test_decoder_layers_of_an_unknown_module_is_an_error():
    with pytest.raises(ValueError, match="cannot find the transformer layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_lora_top_layers_adapts_only_the_last_blocks():
    model = apply_lora(tiny_backbone(layers=4), r=4, alpha=8, dropout=0.0, target_modules="all-linear", top_layers=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n in trainable}
    assert blocks == {2, 3}
    assert len(decoder_layers(model)) == 4  # found through the peft wrapper
    with pytest.raises(ConfigError, match="model.lora.top_layers must be between 1 and 4, got 9"):
        apply_lora(tiny_backbone(layers=4), r=4, alpha=8, dropout=0.0, target_modules="all-linear", top_layers=9)


def test_trainable_parameters_become_fp32():
    model = apply_lora(tiny_backbone(dtype=torch.bfloat16), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    count = trainable_to_fp32(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert count == sum(p.numel() for p in trainable) > 0
    assert all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)  # frozen stay bf16
