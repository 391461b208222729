"""`denselm export --format onnx`: one ONNX graph from token ids to the normalised embedding.

    denselm export --model out/model --output out/onnx --format onnx

    import numpy as np, onnxruntime as ort
    sess = ort.InferenceSession("out/onnx/model.onnx", providers=["CPUExecutionProvider"])
    (emb,) = sess.run(None, {"input_ids": ids, "attention_mask": mask})   # int64 (B, T) -> float32 (B, D)

The graph is ``torch.onnx.export(..., dynamo=True)`` of ``OnnxEmbedder``: the backbone, the model's
position ids (computed inside the graph from ``attention_mask``, so either padding side gives the
same numbers), pooling and L2 normalisation.  Inputs ``input_ids`` and ``attention_mask`` (int64,
batch and sequence axes dynamic); output ``sentence_embedding`` (float32).  The caller formats and tokenizes
the texts as the README's table says (template, suffix, EOS, max lengths), e.g. with the
transformers snippet's ``ids`` function; the README fixes the padding side to the model's (left
for ``end_aligned``).  optimum-onnx is not used: it needs transformers < 4.58.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model.pooling import pool

logger = logging.getLogger(__name__)

OPSET = 18


def position_ids(attention_mask: torch.Tensor, policy: str) -> torch.Tensor:
    """(B, T) positions as ``BiEncoderModel`` computes them, without data-dependent control flow.

    ``end_aligned``: each row's last real token at T - 1 (left padding gives arange(T));
    ``from_zero``: 0 at each row's first real token.  Pads get 0 (masked as keys, never pooled)."""
    mask = attention_mask.to(torch.long)
    if policy == "from_zero":
        return (mask.cumsum(dim=1) - 1).clamp(min=0)
    T = mask.shape[1]
    last = (T - 1) - mask.flip(dims=[1]).argmax(dim=1)  # (B,) index of each row's last real token
    positions = torch.arange(T, device=mask.device).unsqueeze(0) + ((T - 1) - last).unsqueeze(1)
    return (positions * mask).clamp(min=0)


class OnnxEmbedder(nn.Module):
    """(input_ids, attention_mask) -> (B, D) embeddings: backbone, positions, pooling, normalisation."""

    def __init__(self, backbone: nn.Module, pooling: str, normalized: bool, position_policy: str):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.normalized = normalized
        self.position_policy = position_policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = position_ids(attention_mask, self.position_policy)  # (B, T)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=False, return_dict=True)
        reps = pool(out.last_hidden_state, attention_mask, self.pooling).float()  # (B, D)
        return F.normalize(reps, dim=-1) if self.normalized else reps


def unwrap_backbone(model) -> nn.Module:
    """A copy of the plain transformers backbone of a BiEncoderModel, LoRA merged (``model`` is untouched)."""
    import copy

    backbone = copy.deepcopy(model.model)
    if hasattr(backbone, "merge_and_unload"):
        backbone = backbone.merge_and_unload()
    return backbone


def export_onnx(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` (a BiEncoderModel, LoRA merged) as ONNX to ``path`` (weights inside the file,
    or in ``path.name + '.data'`` next to it when over 2 GB)."""
    from .errors import require

    require("onnxscript", "onnx", "the ONNX export (torch.onnx.export(dynamo=True))")
    spec = model.spec
    backbone = unwrap_backbone(model).to(dtype).eval()
    if hasattr(backbone.config, "_attn_implementation"):
        backbone.config._attn_implementation = "sdpa"
    wrapper = OnnxEmbedder(backbone, spec.pooling, spec.normalized, spec.position_ids).eval()
    # Example: 2 rows of different lengths, left padding (any padding traces the same graph).
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]], dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (ids, mask), dynamo=True, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            optimize=True,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=_too_big_for_protobuf(backbone))
    return path


def _too_big_for_protobuf(backbone: nn.Module) -> bool:
    """ONNX protobufs stop at 2 GB: larger weights go to an external data file."""
    size = sum(p.numel() * p.element_size() for p in backbone.parameters())
    return size > 1_800_000_000
