"""BiEncoderModel: a decoder LLM as a bi-encoder, with the seed's interface.

    from denselm import BiEncoderModel
    model = BiEncoderModel(model=hf_model, tokenizer=tok, normalized=True, temperature=0.02)
    out = model(query=q_inputs, passage=p_inputs, messages=["normal"], teacher_scores=None)
    out.loss.backward()

backbone -> pool (each row's last real token by default) -> optional L2
normalisation -> the pure losses of ``denselm.losses``.  Everything beyond the
seed is a keyword argument whose default reproduces the seed (FlagEmbedding's
``research/llm_dense_retriever`` BiEncoderModel).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, gradcache, losses
from ..parallel import base_model as _base_model_of
from ..parallel import unwrap
from ..data.tokenize import special_tokens
from ..spec import MANIFEST_NAME, PLAIN, POSITION_POLICIES, BaseModelNotFound, EmbeddingSpec, looks_like_hub_id
from ..spec import manifest_dict, read_manifest, resolve_base_model
from . import speedups
from .speedups import packing as packing_lib
from .speedups.pooled_only import last_mlp_only_at, pooled_positions
from .speedups.fused_norm import fused_norms
from .speedups.lora_add import fast_lora
from .pooling import POOLING_METHODS, last_token_indices, pool

logger = logging.getLogger(__name__)

ADDED_EMBEDDINGS_NAME = "added_embeddings.safetensors"


@dataclass
class EncoderOutput:
    """What ``forward`` returns (the seed's fields)."""

    loss: torch.Tensor | None = None
    """Training loss (the global-batch value under cross-device negatives); None in eval mode."""
    scores: torch.Tensor | None = None
    """Training: (B, N) / temperature ("normal") or (B, G) ("custom"); eval: q @ p.T."""
    q_reps: torch.Tensor | None = None
    p_reps: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Loss parts for logging: contrastive, distillation."""


class EmbeddingDistillation(nn.Module):
    """Teacher-embedding distillation terms (the teacher's vectors are inputs, never computed here).

    ``embed_weight`` x distance(projection(student), teacher) over queries and passages
    (the mean of the two, as sentence-transformers' EmbedDistillLoss averages columns), plus
    ``similarity_weight`` x the in-batch similarity-matrix match (dimension-free).
    The projection (float32, D -> Dt) lives in training checkpoints only: ``save`` exports the backbone.
    """

    def __init__(self, student_dim: int, teacher_dim: int, embed_weight: float = 1.0, similarity_weight: float = 0.0,
                 distance: str = "cosine", similarity_kind: str = "mse", student_temperature: float = 1.0,
                 teacher_temperature: float = 1.0):
        super().__init__()
        if distance not in losses.EMBED_DISTANCES:
            raise ValueError(f"distance must be one of {losses.EMBED_DISTANCES}, got {distance!r}")
        if similarity_kind not in losses.SIMILARITY_DISTILL_KINDS:
            raise ValueError(f"similarity_kind must be one of {losses.SIMILARITY_DISTILL_KINDS}, got {similarity_kind!r}")
        self.projection = nn.Linear(student_dim, teacher_dim) if embed_weight > 0 else None
        self.embed_weight, self.similarity_weight, self.distance = float(embed_weight), float(similarity_weight), distance
        # "kl": the student's logits are its contrastive scores, similarity / student_temperature
        self.similarity_kind = similarity_kind
        self.student_temperature, self.teacher_temperature = float(student_temperature), float(teacher_temperature)

    def forward(self, q, p, tq, tp, all_p, all_tp) -> tuple[torch.Tensor, dict[str, float]]:
        """q (B, D), p (B*G, D), teacher tq (B, Dt), tp (B*G, Dt); all_p / all_tp: the passages scored against."""
        loss, parts = q.new_zeros(()), {}
        if self.projection is not None:
            w = self.projection.weight
            ed = 0.5 * (losses.embedding_distillation_loss(self.projection(q.to(w.dtype)), tq, self.distance)
                        + losses.embedding_distillation_loss(self.projection(p.to(w.dtype)), tp, self.distance))
            parts["embed_distillation"] = float(ed.detach())
            loss = loss + self.embed_weight * ed
        if self.similarity_weight > 0:
            if self.similarity_kind == "kl":
                student_scores = losses.similarity(q, all_p) / self.student_temperature  # (B, N)
                sd = losses.listwise_similarity_distillation_loss(student_scores, tq, all_tp, self.teacher_temperature)
            else:
                sd = losses.similarity_distillation_loss(q, all_p, tq, all_tp)
            parts["similarity_distillation"] = float(sd.detach())
            loss = loss + self.similarity_weight * sd
        return loss, parts


class BiEncoderModel(nn.Module):
    """The seed's BiEncoderModel, made correct for any padding side and world size.

    Args (the seed's): ``model`` a transformers decoder (or a peft model around
    one), ``tokenizer``, ``normalized`` (seed spelling ``normlized`` accepted),
    ``negatives_cross_device``, ``temperature``, ``sub_batch_size``.

    spec: the ``denselm.spec.EmbeddingSpec`` (text format, pooling, normalisation, positions,
      packing...), saved by ``save``.  Without it the seed's arguments give a ``PLAIN`` spec; the
      keyword arguments below that belong to the spec (normalized, pooling, position_ids, packing)
      override its fields when given.

    Beyond the seed (defaults reproduce it):
      pooling: "last" | "mean" | "first".
      teacher_temperature: teacher scores are divided by it before their softmax.
      distill_weight: weight of the distillation term.
      distill_loss: "soft_ce" (seed) or "kl".
      distill_in_custom_mode: the seed ignores teacher scores in custom mode; True uses them.
      grad_cache: memory-bounded encoding (see ``denselm.gradcache``); chunks of at most
        ``grad_cache_chunk_size`` rows and ``grad_cache_max_tokens`` padded tokens.
      position_ids: "end_aligned" gives each row's last real token the position a
        left-padded batch gives it (the seed's numbers, for either padding side);
        "from_zero" starts every sequence at 0 (batch-independent; packing uses it).
      packing: padding-free encoding (see ``denselm.model.speedups.packing``): each batch (or
        sub-batch / gradient-cache chunk) is packed into rows of at most
        ``packing_max_tokens`` real tokens; implies ``position_ids="from_zero"``.
      manifest: a dict of spec fields (template, max lengths...; the pre-spec way, still accepted);
        other keys are kept and saved as they are.
      loss_options: ``losses.LossOptions`` (margin masks, extra InfoNCE terms, hardness
        weighting); None = the seed's loss.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        normalized: bool | None = None,
        negatives_cross_device: bool = False,
        temperature: float = 1.0,
        sub_batch_size: int = -1,
        *,
        normlized: bool | None = None,
        spec: EmbeddingSpec | None = None,
        pooling: str | None = None,
        teacher_temperature: float = 1.0,
        distill_weight: float = 1.0,
        distill_loss: str = "soft_ce",
        distill_in_custom_mode: bool = False,
        grad_cache: bool = False,
        grad_cache_chunk_size: int | None = None,
        grad_cache_max_tokens: int | None = None,
        position_ids: str | None = None,
        packing: bool | None = None,
        packing_max_tokens: int | None = packing_lib.DEFAULT_MAX_TOKENS,
        manifest: dict | None = None,
        loss_options: losses.LossOptions | None = None,
    ):
        super().__init__()
        if model is None:
            raise ValueError("BiEncoderModel needs `model` (a transformers decoder or a peft model)")
        if normalized is not None and normlized is not None and bool(normalized) != bool(normlized):
            raise ValueError(f"normalized={normalized} and normlized={normlized} disagree; pass one of them")
        if normalized is None:
            normalized = normlized
        if normalized is None and spec is None:
            normalized = False  # the seed's default
        if pooling is not None and pooling not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {pooling!r}")
        if position_ids is not None and position_ids not in POSITION_POLICIES:
            raise ValueError(f"position_ids must be one of {POSITION_POLICIES}, got {position_ids!r}")
        base = spec if spec is not None else PLAIN
        manifest = dict(manifest or {})
        base = EmbeddingSpec.from_dict(manifest, fallback=base)
        changes = {k: v for k, v in (("normalized", None if normalized is None else bool(normalized)),
                                     ("pooling", pooling), ("position_ids", position_ids),
                                     ("packing", None if packing is None else bool(packing))) if v is not None}
        if changes.get("packing") and changes.get("position_ids", base.position_ids) != "from_zero":
            # Packed rows restart positions at 0 per sequence; record that policy so the
            # padded path (and the manifest, hence inference) uses the same positions.
            logger.info("packing=True: position_ids policy %r -> 'from_zero'", changes.get("position_ids", base.position_ids))
        spec = base.replace(**changes)
        normalized = spec.normalized
        if distill_loss not in ("soft_ce", "kl"):
            raise ValueError(f"distill_loss must be 'soft_ce' or 'kl', got {distill_loss!r}")
        if temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(f"temperature and teacher_temperature must be > 0, got {temperature}, {teacher_temperature}")
        if negatives_cross_device and not distributed.is_initialized():
            raise ValueError(
                "negatives_cross_device=True needs an initialised torch.distributed process group "
                "(launch with torchrun, or call torch.distributed.init_process_group first)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.negatives_cross_device = negatives_cross_device
        if not normalized and temperature != 1.0:
            # The seed silently does this; users rely on it, so keep it but say so.
            logger.warning(
                "normalized=False: temperature %s is reset to 1.0 (the seed's behaviour); "
                "scores are raw inner products", temperature,
            )
            temperature = 1.0
        self.temperature = float(temperature)
        self.sub_batch_size = int(sub_batch_size)
        self.teacher_temperature = float(teacher_temperature)
        self.distill_weight = float(distill_weight)
        self.distill_loss = distill_loss
        self.distill_in_custom_mode = distill_in_custom_mode
        self.loss_options = loss_options or losses.LossOptions()
        self.embed_distill: EmbeddingDistillation | None = None  # enable_embedding_distillation()
        self.grad_cache = grad_cache
        self.grad_cache_chunk_size = grad_cache_chunk_size
        self.grad_cache_max_tokens = grad_cache_max_tokens
        if grad_cache and grad_cache_chunk_size is None and grad_cache_max_tokens is None:
            self.grad_cache_chunk_size = sub_batch_size if sub_batch_size > 0 else 8
        self.packing_max_tokens = packing_max_tokens
        if self.packing:
            packing_lib.enable(model)
        # Keys of a legacy ``manifest`` dict that are not spec fields: kept and saved as they were.
        self.extra_manifest = {k: v for k, v in manifest.items() if k not in EmbeddingSpec.__dataclass_fields__}
        self._warned_custom_teacher = False
        self.prefix_cache = None

    def enable_prefix_cache(self, num_frozen: int, max_bytes: int = 8 << 30):
        """Compute blocks ``0 .. num_frozen-1`` once per distinct text (see ``denselm.model.speedups.prefix_cache``).

        Needs every trainable parameter above them and batch-independent positions."""
        from .speedups.prefix_cache import FrozenPrefixCache

        speedups.validate({"train.cache_frozen_layers": True, "model.position_ids": self.position_policy,
                           "model.packing": self.packing})
        self.prefix_cache = FrozenPrefixCache(unwrap(self.model), num_frozen, max_bytes)
        return self.prefix_cache

    # The seed's attribute name, kept for code that reads it.
    @property
    def normlized(self) -> bool:
        return self.normalized

    # Spec fields under their historical attribute names (read by train, inference, export, serving).
    @property
    def normalized(self) -> bool:
        return self.spec.normalized

    @property
    def pooling(self) -> str:
        return self.spec.pooling

    @property
    def packing(self) -> bool:
        return self.spec.packing

    @property
    def position_policy(self) -> str:
        return self.spec.position_ids

    @position_policy.setter
    def position_policy(self, value: str) -> None:
        self.spec = self.spec.replace(position_ids=value)

    @property
    def manifest(self) -> dict:
        """The text-format part of the spec as a dict (template, prompt, max lengths, ...), plus extra keys."""
        head = ("normalized", "pooling", "position_ids", "packing")
        return {**{k: v for k, v in self.spec.to_dict().items() if k not in head}, **self.extra_manifest}

    def loss_settings(self) -> dict:
        """The training-only constructor arguments (everything that is not the spec, model or tokenizer)."""
        return {
            "negatives_cross_device": self.negatives_cross_device, "temperature": self.temperature,
            "sub_batch_size": self.sub_batch_size, "teacher_temperature": self.teacher_temperature,
            "distill_weight": self.distill_weight, "distill_loss": self.distill_loss,
            "distill_in_custom_mode": self.distill_in_custom_mode, "grad_cache": self.grad_cache,
            "grad_cache_chunk_size": self.grad_cache_chunk_size, "grad_cache_max_tokens": self.grad_cache_max_tokens,
            "packing_max_tokens": self.packing_max_tokens, "loss_options": self.loss_options,
        }

    def with_backbone(self, backbone: nn.Module, **changes) -> "BiEncoderModel":
        """The same spec and settings around another backbone module (e.g. DDP's ``.module``);
        ``changes`` override loss settings (a one-rank view passes negatives_cross_device=False)."""
        kwargs = {**self.loss_settings(), **changes}
        view = type(self)(model=backbone, tokenizer=self.tokenizer, spec=self.spec,
                          manifest=self.extra_manifest, **kwargs)
        view.prefix_cache = self.prefix_cache  # the same frozen layers: its texts are cached too
        return view

    # ------------------------------------------------------------------ encoding
    def _backbone(self) -> nn.Module:
        return self.model

    def _encode_padded(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """One padded batch through the backbone: (B, T) ids -> (B, D) embeddings (float32 or wider)."""
        if "attention_mask" not in features or "input_ids" not in features:
            raise ValueError(
                f"features need 'input_ids' and 'attention_mask'; got keys {sorted(features)}"
            )
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids shape {tuple(input_ids.shape)} != attention_mask shape {tuple(attention_mask.shape)}"
            )
        serving = (self.prefix_cache.serving(features, packed=self.packing, max_tokens=self.packing_max_tokens) if self.prefix_cache is not None
                   else contextlib.nullcontext())
        with serving:
            reps = self._pooled(features)
        reps = reps.to(torch.promote_types(reps.dtype, torch.float32))
        if self.normalized:
            reps = F.normalize(reps, dim=-1)
        return reps.contiguous()

    def _pooled(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) pooled hidden states, packed or padded."""
        backbone = self._backbone()
        # fused_norms: no_grad only, one fused pass per RMSNorm; fast_lora: LoRA updates added in place
        with fused_norms(backbone), fast_lora(backbone):
            return self._pooled_unfused(features)

    def _pooled_unfused(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if self.packing:
            # Real tokens only, positions from 0 per sequence (features' position_ids unused).
            reps = packing_lib.encode_features(self._backbone(), features, self.pooling, self.packing_max_tokens)
        else:
            position_ids = features.get("position_ids")
            if position_ids is None:
                position_ids = self._position_ids(attention_mask)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            positions = pooled_positions(attention_mask, self.pooling)
            with last_mlp_only_at(self._backbone(), positions):  # the last MLP at the pooled tokens only
                out = self._backbone()(**kwargs, return_dict=True, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, D)
            reps = pool(hidden, attention_mask, self.pooling)  # (B, D)
        return reps

    def _position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) positions.  Pad positions get 0 (never read: pads are masked as keys)."""
        mask = attention_mask.to(torch.long)
        if self.position_policy == "from_zero":
            return (mask.cumsum(dim=1) - 1).clamp(min=0)
        T = mask.shape[1]
        # Left padding: arange(T), exactly the seed's default.  Other rows are shifted so
        # their last real token sits at T - 1 too: RoPE sees the same absolute positions.
        shift = (T - 1) - last_token_indices(mask)  # (B,)
        positions = torch.arange(T, device=mask.device).unsqueeze(0) + shift.unsqueeze(1)
        return (positions * mask).clamp(min=0)

    def with_positions(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add ``position_ids`` computed on the whole batch, so chunks (trimmed to their own
        length) keep the positions the unchunked batch would give: chunking never changes numbers."""
        if "position_ids" in features:
            return features
        return {**features, "position_ids": self._position_ids(features["attention_mask"])}

    def encode(self, features: dict | Sequence[dict] | None) -> torch.Tensor | None:
        """Embeddings (B, D) for a dict of tensors, or a list of dicts (pre-split sub-batches).

        ``sub_batch_size > 0`` encodes in chunks of that many rows and concatenates
        them (gradients kept, as the seed; use ``grad_cache`` to bound memory).
        """
        if features is None:
            return None
        if isinstance(features, (list, tuple)):
            return torch.cat([self.encode(f) for f in features], dim=0)
        if self.sub_batch_size > 0 and features["input_ids"].shape[0] > self.sub_batch_size:
            chunks = gradcache.split_features(self.with_positions(features), max_rows=self.sub_batch_size)
            return torch.cat([self._encode_padded(c) for c in chunks], dim=0)
        return self._encode_padded(features)

    # ------------------------------------------------------------------- forward
    def forward(
        self,
        query: dict | Sequence[dict] | None = None,
        passage: dict | Sequence[dict] | None = None,
        messages: Sequence[str] | None = None,
        teacher_scores: Sequence[float] | torch.Tensor | None = None,
        false_negative_mask: torch.Tensor | None = None,
        teacher_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> EncoderOutput:
        """Training: loss over in-batch (+ cross-device) negatives or own groups, plus distillation.

        ``teacher_embeddings``: (queries (B, Dt), passages (B * G, Dt)) of a teacher, used
        once ``enable_embedding_distillation`` was called.

        Eval (``model.eval()``): scores = q @ p.T, no loss.
        """
        mode = self._mode(messages)
        if not self.training or query is None or passage is None:
            q_reps, p_reps = self.encode(query), self.encode(passage)
            scores = losses.similarity(q_reps, p_reps) if q_reps is not None and p_reps is not None else None
            return EncoderOutput(loss=None, scores=scores, q_reps=q_reps, p_reps=p_reps)

        if self.grad_cache and torch.is_grad_enabled():
            return self._forward_grad_cache(query, passage, mode, teacher_scores, false_negative_mask, teacher_embeddings)
        q_reps, p_reps = self.encode(query), self.encode(passage)
        loss, scores, metrics = self.compute_loss(q_reps, p_reps, mode, teacher_scores, false_negative_mask,
                                                  teacher_embeddings)
        return EncoderOutput(loss=loss, scores=scores, q_reps=q_reps, p_reps=p_reps, metrics=metrics)

    @staticmethod
    def _mode(messages: Sequence[str] | None) -> str:
        if messages is None:
            return "normal"
        if isinstance(messages, str):
            messages = [messages]
        if len(messages) == 0:
            return "normal"
        kinds = {losses.MODES.get(m) for m in messages}
        if None in kinds or len(kinds) != 1:
            raise ValueError(
                f"messages must be ['normal'], ['custom'] or ['not in-batch'] (one mode per batch); got {list(messages)}"
            )
        return kinds.pop()

    def compute_loss(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        mode: str = "normal",
        teacher_scores: Sequence[float] | torch.Tensor | None = None,
        false_negative_mask: torch.Tensor | None = None,
        teacher_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Loss from embeddings: q (B, D), p (B * G, D) on this process.

        Returns (loss, scores, metrics).  Under cross-device negatives the loss's
        gradient is this rank's share of the global loss (see distributed.py) and
        its value is the global loss.
        """
        B, P = q_reps.shape[0], p_reps.shape[0]
        if B == 0 or P % B != 0:
            raise ValueError(
                f"passage count must be a positive multiple of query count: got {P} passages for {B} queries"
            )
        G = P // B
        teacher = self._teacher_tensor(teacher_scores, B, G, q_reps.device)
        mask_teacher = teacher  # the teacher-margin mask uses the scores even where distillation does not
        if teacher is not None and mode == "custom" and not self.distill_in_custom_mode:
            if not self._warned_custom_teacher:
                logger.warning(
                    "teacher_scores are ignored in 'custom' mode (the seed's behaviour); "
                    "set distill_in_custom_mode=True to distil there"
                )
                self._warned_custom_teacher = True
            teacher = None

        cross = self.negatives_cross_device and distributed.is_initialized() and distributed.info().world_size > 1
        metrics: dict[str, float] = {}
        opts = self.loss_options
        raw_local = losses.group_scores(q_reps, p_reps, G)  # (B, G) before the temperature
        local = raw_local / self.temperature  # (B, G)
        all_p = p_reps  # (N, D): the passages scored against
        if mode == "normal":
            if cross:
                all_p = distributed.all_gather_with_grad(p_reps)  # (W * B * G, D)
                offset = distributed.info().rank * B
            else:
                all_p, offset = p_reps, 0
            if false_negative_mask is not None and false_negative_mask.shape != (B, all_p.shape[0]):
                raise ValueError(
                    f"false_negative_mask must be (queries, all passages) = {(B, all_p.shape[0])}, "
                    f"got {tuple(false_negative_mask.shape)}"
                )
            if opts.is_default:
                scores = losses.similarity(q_reps, all_p) / self.temperature  # (B, N)
                loss = losses.in_batch_contrastive_loss(scores, G, offset, false_negative_mask)
            else:
                loss, scores = self._extended_loss(q_reps, all_p, G, offset, cross, mask_teacher, false_negative_mask, metrics)
        else:
            scores = local
            fn_local = None
            if false_negative_mask is not None:
                if false_negative_mask.shape == (B, G):
                    fn_local = false_negative_mask
                elif false_negative_mask.dim() == 2 and false_negative_mask.shape[0] == B and false_negative_mask.shape[1] % G == 0:
                    # A (B, all passages) mask, as the collator builds over the global batch:
                    # keep each query's own group columns.
                    n_queries = false_negative_mask.shape[1] // G
                    offset = distributed.info().rank * B if n_queries > B else 0
                    cols = ((torch.arange(B) + offset) * G).unsqueeze(1) + torch.arange(G)  # (B, G)
                    fn_local = false_negative_mask.gather(1, cols.to(false_negative_mask.device))
                else:
                    raise ValueError(
                        f"in 'custom' mode false_negative_mask must be (queries, group) = {(B, G)}, "
                        f"got {tuple(false_negative_mask.shape)}"
                    )
            if opts.margin is not None or (opts.teacher_margin is not None and mask_teacher is not None):
                fn_local = self._local_masks(raw_local, mask_teacher, fn_local, metrics)
            loss = losses.local_contrastive_loss(local, fn_local)
        metrics["contrastive"] = float(loss.detach())
        if teacher is not None:
            kd = losses.distillation_loss(local, teacher, self.teacher_temperature, self.distill_loss)
            metrics["distillation"] = float(kd.detach())
            loss = loss + self.distill_weight * kd
        if self.embed_distill is not None and teacher_embeddings is not None:
            tq, tp = (torch.as_tensor(t, device=q_reps.device) for t in teacher_embeddings)  # (B, Dt), (B * G, Dt)
            # the similarity term scores the passages the contrastive loss does (all ranks' in "normal" mode)
            gather = cross and mode == "normal"
            all_tp = distributed.all_gather_with_grad(tp.contiguous()) if gather else tp
            ed, parts = self.embed_distill(q_reps, p_reps, tq, tp, all_p if gather else p_reps, all_tp)
            metrics.update(parts)
            loss = loss + ed
        if cross:
            # Report the global value; keep this rank's gradient (value shift is detached).
            global_loss = distributed.all_reduce_mean(loss)
            loss = loss + (global_loss - loss).detach()
        return loss, scores, metrics

    def _extended_loss(self, q_reps, all_p, G, offset, cross, teacher, false_negative_mask, metrics):
        """The "normal" loss with ``self.loss_options``; records the fraction of negatives each mask removed."""
        opts = self.loss_options
        all_q = distributed.all_gather_with_grad(q_reps) if cross and opts.needs_all_queries else q_reps  # (Q, D)
        masks = {"false_negatives": false_negative_mask}
        if opts.teacher_margin is not None and teacher is not None:
            masks["teacher_margin"] = losses.teacher_margin_mask(teacher, opts.teacher_margin, all_p.shape[0], offset)
        res = losses.extended_contrastive_loss(
            q_reps, all_p, G, self.temperature, offset, all_q, masks, opts.margin,
            opts.directions, opts.partition_mode, opts.hardness_mode, opts.hardness_strength,
        )
        target = losses.positive_columns(q_reps.shape[0], G, offset, q_reps.device)
        if res.masks:
            any_mask = torch.stack(list(res.masks.values())).any(0)
            res.masks["any"] = any_mask
        metrics["masked/false_negatives"] = 0.0  # the same keys on every rank, mask or not (logs all-reduce them)
        for name, m in res.masks.items():
            metrics[f"masked/{name}"] = losses.masked_fraction(m, target)
        metrics.setdefault("masked/any", 0.0)
        return res.loss, res.scores

    def _local_masks(self, raw_local, teacher, fn_local, metrics):
        """Custom mode: margin and teacher-margin masks over each query's own group (B, G)."""
        opts = self.loss_options
        B, G = raw_local.shape
        target = torch.zeros(B, dtype=torch.long, device=raw_local.device)
        masks = {"false_negatives": None if fn_local is None else fn_local.to(raw_local.device, torch.bool)}
        if opts.margin is not None:
            masks["margin"] = losses.margin_mask(raw_local, raw_local[:, 0], opts.margin)
        if opts.teacher_margin is not None and teacher is not None:
            masks["teacher_margin"] = teacher.detach() > teacher[:, :1].detach() + opts.teacher_margin  # (B, G)
        metrics["masked/false_negatives"] = 0.0  # the same keys on every rank, mask or not
        masks = {k: v for k, v in masks.items() if v is not None}
        combined = torch.stack(list(masks.values())).any(0)
        masks["any"] = combined
        for name, m in masks.items():
            metrics[f"masked/{name}"] = losses.masked_fraction(m, target)
        return combined

    @staticmethod
    def _teacher_tensor(teacher_scores, B: int, G: int, device) -> torch.Tensor | None:
        if teacher_scores is None:
            return None
        t = torch.as_tensor(teacher_scores, dtype=torch.float32, device=device)
        if t.numel() != B * G:
            raise ValueError(
                f"teacher_scores must hold one score per passage ({B} queries x group {G} = {B * G}), got {t.numel()}"
            )
        return t.reshape(B, G)

    # --------------------------------------------------------- gradient caching
    def _forward_grad_cache(self, query, passage, mode, teacher_scores, false_negative_mask,
                            teacher_embeddings=None) -> EncoderOutput:
        """Encode without graph, cache d(loss)/d(embeddings), re-encode chunk by chunk in backward."""
        sides = []
        for feats in (query, passage):
            feats_list = list(feats) if isinstance(feats, (list, tuple)) else [feats]
            chunks = [
                c
                for f in feats_list
                for c in gradcache.split_features(self.with_positions(f), self.grad_cache_chunk_size, self.grad_cache_max_tokens)
            ]
            sides.append(gradcache.encode_without_graph(self._encode_padded, chunks))
        q_side, p_side = sides
        with torch.enable_grad():
            loss, scores, metrics = self.compute_loss(q_side.reps, p_side.reps, mode, teacher_scores, false_negative_mask,
                                                      teacher_embeddings)
            # Parameters of the loss itself (the distillation projection) get their gradient here, not on replay.
            head = [p for p in self.embed_distill.parameters() if p.requires_grad] if self.embed_distill is not None else []
            q_grad, p_grad, *head_grads = torch.autograd.grad(loss, [q_side.reps, p_side.reps, *head], allow_unused=True)
        grads = [
            q_grad if q_grad is not None else torch.zeros_like(q_side.reps),
            p_grad if p_grad is not None else torch.zeros_like(p_side.reps),
        ]
        cached_loss = loss.detach().requires_grad_(True)
        backbone = self._backbone()
        no_sync = getattr(backbone, "no_sync", None)

        def _replay(grad_output: torch.Tensor):
            # Runs inside the caller's loss.backward(); grad_output carries any loss scaling
            # (1 / accumulation steps, AMP scale).
            gradcache.backward_cached(self._encode_padded, sides, grads, no_sync=no_sync, grad_scale=grad_output)
            for param, g in zip(head, head_grads):
                if g is not None:
                    g = g * grad_output
                    param.grad = g if param.grad is None else param.grad + g
            return grad_output

        cached_loss.register_hook(_replay)
        return EncoderOutput(
            loss=cached_loss, scores=scores.detach(), q_reps=q_side.reps.detach(), p_reps=p_side.reps.detach(), metrics=metrics
        )

    # ------------------------------------------------- embedding distillation
    def enable_embedding_distillation(self, teacher_dim: int, embed_weight: float = 1.0, similarity_weight: float = 0.0,
                                      distance: str = "cosine", student_dim: int | None = None,
                                      similarity_kind: str = "mse", teacher_temperature: float = 1.0
                                      ) -> "EmbeddingDistillation":
        """Add the teacher-embedding terms (a trained projection D -> Dt; never exported by ``save``).

        ``similarity_kind`` "kl": the in-batch term is a KL between softmaxes, the student's at this
        model's temperature, the teacher's cosines at ``teacher_temperature``."""
        if student_dim is None:
            student_dim = int(_base_model_of(unwrap(self.model)).config.hidden_size)
        device = next(self.model.parameters()).device
        self.embed_distill = EmbeddingDistillation(student_dim, teacher_dim, embed_weight, similarity_weight, distance,
                                                   similarity_kind, self.temperature, teacher_temperature).to(device)
        return self.embed_distill

    # ------------------------------------------------------------ memory knobs
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Non-reentrant checkpointing (works with DDP, gradient caching and frozen inputs)."""
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        inner = unwrap(self.model)
        inner.gradient_checkpointing_enable(**kwargs)
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()

    # ------------------------------------------------------------ save / load
    def settings(self, model_folder: str | os.PathLike = ".") -> dict:
        """The ``denselm.json`` content: the spec (base model recorded for ``model_folder``, see
        ``denselm.spec.record_base_model``) and what inference tools may read beside it."""
        specials = special_tokens(self.tokenizer) if self.tokenizer is not None else None
        base = unwrap(self.model)
        spec = self.spec
        if spec.base_model is None:
            spec = spec.replace(base_model=_base_model_path(base))
        record = {
            "adapter": hasattr(base, "peft_config"),
            "architecture": type(_base_model_of(base)).__name__,
            "temperature": self.temperature,  # training-only: recorded for reference
            "eos_policy": {
                "append_eos": True,
                "eos_token_id": specials.eos_id if specials else None,
                "prefix_token_ids": list(specials.prefix) if specials else [],
                "pad_token_id": specials.pad_id if specials else None,
            },
        }
        # Other keys (written by other tools, or a legacy manifest's) are kept; ours win.
        kept = {k: v for k, v in self.extra_manifest.items() if k not in ("format", "version")}
        return manifest_dict(spec, model_folder, **{**kept, **record})

    def save(self, output_dir: str | os.PathLike, *, merge_lora: bool = False, state_dict: dict | None = None) -> Path:
        """Weights (safetensors) + tokenizer + ``denselm.json``, written atomically.

        A LoRA model saves its adapter (and the base model's path in the manifest)
        unless ``merge_lora``.  ``state_dict``: pre-gathered full weights (FSDP).
        """
        from denselm.io import atomic_folder

        output_dir = Path(output_dir)
        with atomic_folder(output_dir, point="model") as tmp:  # the old folder stays until the new one is whole
            base = unwrap(self.model)
            manifest = self.settings(output_dir)
            if merge_lora and hasattr(base, "merge_and_unload"):
                import copy

                merged = copy.deepcopy(base).merge_and_unload()
                merged.save_pretrained(tmp, safe_serialization=True)
                manifest["adapter"] = False
            elif manifest["adapter"]:
                # Only the adapter (and trained added-token rows): never a copy of the base embedding.
                base.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, save_embedding_layers=False)
            else:
                base.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            added = list(self.spec.added_tokens)
            if added and self.tokenizer is not None and manifest["adapter"]:
                # New token rows (e.g. <instruct>) are trained but live in the frozen base
                # embedding: store just those rows, as safetensors (never pickled modules).
                from safetensors.torch import save_file

                ids = self.tokenizer.convert_tokens_to_ids(added)
                emb = _base_model_of(base).get_input_embeddings().weight
                save_file({"token_ids": torch.tensor(ids), "embeddings": emb[ids].detach().cpu().contiguous()}, tmp / ADDED_EMBEDDINGS_NAME)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return output_dir

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        base_model: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **overrides,
    ) -> "BiEncoderModel":
        """Load a folder written by ``save`` (adapter or full weights, any ``denselm.json`` version) for encoding.

        ``base_model``: the base of a LoRA adapter (a folder or hub id), instead of the one recorded
        (``denselm.spec.resolve_base_model``); a missing base raises ``BaseModelNotFound`` naming
        ``--base-model`` and the recorded value.  ``overrides``: constructor arguments (e.g. ``normalized``).
        """
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        manifest = read_manifest(path)
        # A relative base path is relative to this folder: hold it resolved, so saving elsewhere re-records it.
        spec = manifest.spec.replace(base_model=resolve_base_model(manifest.spec.base_model, path))
        tokenizer = AutoTokenizer.from_pretrained(path)
        dtype_kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
        if manifest.adapter:
            from peft import PeftModel

            if base_model is not None and not Path(base_model).expanduser().exists() and not looks_like_hub_id(str(base_model)):
                raise BaseModelNotFound(path, manifest.spec.base_model, given=str(base_model))
            base_path = str(Path(base_model).expanduser()) if base_model is not None else resolve_base_model(spec.base_model, path)
            if not base_path or not (Path(base_path).exists() or looks_like_hub_id(base_path)):
                raise BaseModelNotFound(path, manifest.spec.base_model)
            spec = spec.replace(base_model=base_path)
            try:
                backbone = AutoModel.from_pretrained(base_path, **dtype_kw)
            except OSError:
                if Path(base_path).exists():
                    raise
                raise BaseModelNotFound(path, manifest.spec.base_model,
                                        given=str(base_model) if base_model else None) from None
            if spec.num_layers:
                # Trained on the first N layers: the adapter only fits that truncated model.
                from .backbone import truncate_layers

                truncate_layers(backbone, int(spec.num_layers))
            if len(tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
                backbone.resize_token_embeddings(len(tokenizer))
            added_file = path / ADDED_EMBEDDINGS_NAME
            if added_file.exists():
                from safetensors.torch import load_file

                added = load_file(added_file)
                with torch.no_grad():
                    backbone.get_input_embeddings().weight[added["token_ids"]] = added["embeddings"].to(
                        backbone.get_input_embeddings().weight.dtype
                    )
            backbone = PeftModel.from_pretrained(backbone, path)
        else:
            backbone = AutoModel.from_pretrained(path, **dtype_kw)
        if device is not None:
            backbone = backbone.to(device)
        kwargs = {"temperature": manifest.temperature} if manifest.temperature is not None else {}
        kwargs.update(overrides)
        model = cls(model=backbone, tokenizer=tokenizer, spec=spec, manifest=manifest.extra, **kwargs)
        model.eval()
        return model


def _base_model_path(module: nn.Module) -> str | None:
    base = _base_model_of(module)
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    if name and Path(name).exists():
        return str(Path(name).resolve())
    return name or None
