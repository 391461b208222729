"""Loading the decoder backbone: dtype, layer truncation, added tokens, LoRA, fp32 trainables."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..parallel import base_model
from denselm.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a transformers decoder (LlamaModel.layers, ...)."""
    base = base_model(model)  # under DDP / peft wrappers
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    inner = getattr(base, "model", None)
    if inner is not None and inner is not base:
        return decoder_layers(inner)
    raise ValueError(f"cannot find the transformer layers of {type(base).__name__}")


def layer_attribute(model: nn.Module) -> str:
    """Name of the block list ("layers" for Llama/Qwen/Mistral/Gemma, "h" for GPT-2)."""
    base = base_model(model)  # under DDP / peft wrappers
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(base, attr, None), nn.ModuleList):
            return attr
    return "layers"


def truncate_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first ``num_layers`` blocks (and fix the config so save/load agree)."""
    layers = decoder_layers(model)
    if num_layers > len(layers):
        raise ConfigError(f"model.num_layers={num_layers} but the model has only {len(layers)} layers")
    del layers[num_layers:]
    cfg = model.config
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    return model


def load_backbone(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    num_layers: int | None = None,
) -> nn.Module:
    """AutoModel (no LM head: we only need hidden states) in ``dtype``."""
    from transformers import AutoModel

    from pathlib import Path

    local = Path(name_or_path).expanduser()
    name_or_path = str(local) if local.exists() else name_or_path
    model = AutoModel.from_pretrained(name_or_path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules, trainable_token_ids=None,
               top_layers: int | None = None) -> nn.Module:
    """Wrap with peft LoRA; freeze the rest.  ``trainable_token_ids``: rows of the input
    embedding (added tokens) that train too (peft's trainable_token_indices).
    ``top_layers``: adapt only the last N blocks, so backward never enters the ones below."""
    from peft import LoraConfig, get_peft_model

    kwargs = {}
    if top_layers is not None:
        n = len(decoder_layers(model))
        if not 1 <= top_layers <= n:
            raise ConfigError(f"model.lora.top_layers must be between 1 and {n}, got {top_layers}")
        kwargs["layers_to_transform"] = list(range(n - top_layers, n))
        kwargs["layers_pattern"] = layer_attribute(model)
        if isinstance(target_modules, str) and target_modules == "all-linear":
            # peft wants explicit names with layers_to_transform: every linear inside the blocks.
            target_modules = sorted({name.rsplit(".", 1)[-1] for name, mod in decoder_layers(model).named_modules()
                                     if isinstance(mod, nn.Linear)})
    if trainable_token_ids:
        kwargs["trainable_token_indices"] = {"embed_tokens": list(trainable_token_ids)}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, **kwargs)
    return get_peft_model(model, config)


def trainable_to_fp32(model: nn.Module) -> int:
    """Trainable parameters in float32 (pure-bf16 LoRA + AdamW diverges); returns their count."""
    count = 0
    for p in model.parameters():
        if p.requires_grad:
            if p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
            count += p.numel()
    return count
