"""Padding-free (packed) encoding: sequences laid end to end, attention kept inside each.

    packed = pack_rows(features, max_tokens=4096)      # from a padded batch, either padding side
    reps = torch.cat([encode_packed(backbone, p, "last") for p in packed])   # (N, D)

A padded batch spends compute on pad tokens (about 40% of a batch of
mixed-length passages padded to its longest).  A packed row holds only real
tokens: ``input_ids`` (1, total), ``position_ids`` restarting at 0 for every
sequence, and ``cu_seqlens`` (N + 1,) marking where each sequence starts.

Attention must never cross a sequence boundary.  Which kernel does that:
- ``flash_attention_2/3/4`` backbones (flash-attn installed): transformers' own
  variable-length path, fed ``cu_seq_lens_*``.
- ``sdpa`` backbones (the default): the attention implementation registered
  here, ``denselm_packed``; it is plain SDPA for padded inputs and, for packed
  rows, PyTorch's built-in flash variable-length kernel
  (``torch.nn.attention.varlen``, CUDA, fp16/bf16; no flash-attn package
  needed) or else one causal SDPA call per sequence (CPU, fp32, dropout).
  Both cost sum(L_i^2), never (sum L_i)^2.
- anything else (``eager``, ``flex_attention``): transformers builds a
  block-diagonal causal mask from the position-id resets.
Rows are bounded by ``max_tokens`` so that no step ever attends (or masks)
over a whole batch's tokens at once.

The backbone's config names ``denselm_packed`` only inside ``attention_scope``
(each packed forward, and each block's recomputation when gradient
checkpointing replays it during backward); after the scope the config is as it
was, so the backbone can be saved, wrapped or used elsewhere unchanged.

Packed positions start at 0 for every sequence, i.e. the padded path's
``position_ids="from_zero"`` policy; with rotary embeddings (Llama, Qwen,
Mistral) every policy gives the same attention scores, as RoPE only sees
relative positions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...parallel import base_model
from ..backbone import decoder_layers
from ..pooling import pool_packed
from .common import SharedSwitch, cpu_flags, swapped
from .pooled_only import last_mlp_only_at, packed_positions

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "denselm_packed"
DEFAULT_MAX_TOKENS = 4096
CAT_RANGE = "denselm_packed_attention_cat"
"""Profiler range around the one copy packed attention makes (benchmarks/profile_encode.py reads it)."""
# Implementations whose transformers integration consumes cu_seq_lens_* kwargs itself.
_FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


@dataclass
class PackedBatch:
    """One packed row of N sequences (``total`` real tokens, no padding)."""

    input_ids: torch.Tensor
    """(1, total) token ids, sequence after sequence."""
    position_ids: torch.Tensor
    """(1, total) positions, 0 at each sequence's first token."""
    cu_seqlens: torch.Tensor
    """(N + 1,) int32: sequence n is tokens ``cu_seqlens[n]:cu_seqlens[n + 1]``."""
    max_seqlen: int
    """Length of the longest sequence (flash kernels size their tiles with it)."""

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def sequence_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) real-token counts; a row without any real token is an error (it has nothing to pool)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    lengths = attention_mask.to(torch.long).sum(dim=1)
    if (lengths == 0).any():
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} hold no real token; cannot pack an empty sequence")
    return lengths


def pack_sequences(sequences: list[torch.Tensor]) -> PackedBatch:
    """Concatenate 1-D id tensors into one packed row."""
    if len(sequences) == 0:
        raise ValueError("pack_sequences needs at least one sequence")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError(f"sequences {(lengths == 0).nonzero().flatten().tolist()} are empty")
    device = sequences[0].device
    input_ids = torch.cat([torch.as_tensor(s, dtype=torch.long, device=device) for s in sequences])
    return _packed(input_ids, lengths.to(device))


def _packed(flat_ids: torch.Tensor, lengths: torch.Tensor) -> PackedBatch:
    """flat_ids (total,), lengths (N,) -> PackedBatch."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=flat_ids.device)
    cu[1:] = lengths.cumsum(0)
    starts = torch.repeat_interleave(cu[:-1].to(torch.long), lengths)  # (total,) start of each token's sequence
    positions = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts
    return PackedBatch(flat_ids.unsqueeze(0), positions.unsqueeze(0), cu, int(lengths.max()))


def pack(features: dict[str, torch.Tensor]) -> PackedBatch:
    """A padded batch (left, right or mixed padding) as one packed row, order kept.

    ``input_ids[attention_mask.bool()]`` walks the rows in order and each row's
    real tokens left to right, so it is the concatenation of the sequences
    whatever side the padding is on.
    """
    input_ids, mask = features["input_ids"], features["attention_mask"]
    if input_ids.shape != mask.shape:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} != attention_mask shape {tuple(mask.shape)}")
    lengths = sequence_lengths(mask)
    return _packed(input_ids[mask.bool()], lengths)


def row_spans(lengths: list[int], max_tokens: int | None) -> list[tuple[int, int]]:
    """Consecutive [start, end) groups of sequences with at most ``max_tokens`` real tokens each.

    A sequence longer than the budget gets a row of its own (sequences are never split).
    """
    if max_tokens is None:
        return [(0, len(lengths))]
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    spans, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > max_tokens:
            spans.append((start, i))
            start, used = i, 0
        used += n
    spans.append((start, len(lengths)))
    return spans


def pack_rows(features: dict[str, torch.Tensor], max_tokens: int | None = DEFAULT_MAX_TOKENS) -> list[PackedBatch]:
    """A padded batch as packed rows of at most ``max_tokens`` real tokens each (order kept)."""
    mask = features["attention_mask"]
    lengths = sequence_lengths(mask).tolist()
    return [
        pack({"input_ids": features["input_ids"][s:e], "attention_mask": mask[s:e]})
        for s, e in row_spans(lengths, max_tokens)
    ]


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence slices of a packed (1, total, ...) or (total, ...) tensor."""
    total = int(cu_seqlens[-1])
    flat = values[0] if values.shape[0] != total else values
    bounds = cu_seqlens.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------- attention
@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    """flash-attn's variable-length kernel when installed, else PyTorch's built-in one, else None."""
    try:
        from flash_attn import flash_attn_varlen_func  # optional dependency

        return "flash_attn", flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return "torch", varlen_attn
    except ImportError:
        return None


def _varlen_flash(query, key, value, cu, max_len, scaling):
    """Variable-length flash attention, or None where no kernel applies (CPU, fp32).

    query (T, H, d), key/value (T, Hkv, d) -> (T, H, d).
    """
    kernel = _varlen_kernel()
    if kernel is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    name, fn = kernel
    if name == "flash_attn":
        return fn(query, key, value, cu, cu, max_len, max_len, causal=True, softmax_scale=scaling)
    return fn(query, key, value, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0),
              enable_gqa=query.shape[1] != key.shape[1])


_varlen_failed = False


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention function: SDPA for padded inputs, per-sequence causal attention for packed rows.

    query (1, H, total, d), key/value (1, Hkv, total, d); returns (1, total, H, d) as transformers expects.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("packing does not support attention softcapping or sinks; use packing=False for this model")
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    window = kwargs.get("sliding_window")
    if window is not None and window < max_len:
        raise ValueError(f"a sequence of {max_len} tokens exceeds the sliding window {window}; use packing=False")
    global _varlen_failed
    if dropout == 0.0 and not _varlen_failed:
        try:
            out = _varlen_flash(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                cu.to(device=query.device, dtype=torch.int32), max_len, scaling)
        except (RuntimeError, NotImplementedError) as err:  # e.g. an architecture the built-in kernel lacks
            logger.warning("variable-length flash attention failed (%s); using one SDPA call per sequence", err)
            _varlen_failed = True
            out = None
        if out is not None:
            return out.unsqueeze(0), None  # (1, total, H, d)
    # One causal SDPA per sequence: exact sum(L_i^2) cost; on CPU this beats a
    # block-diagonal mask over the row (measured: benchmarks/speed_bench.py).
    # Sequence i is a (1, H, L_i, d) view of transformers' (total, H, d) memory: no copy in.
    # The views come from one split per tensor, not one slice per sequence: a slice's
    # backward is a zero tensor of the whole row with its part filled in, and autograd then
    # adds the n of them, O(n * total) per tensor and layer (8% of a demo training step of
    # 96 short texts); split's backward is a single cat.  The one copy out is the cat along
    # tokens, which rebuilds that layout; it stands in for the padded path's
    # transpose(1, 2).contiguous() of the attention output (measured: 1.8% of packed
    # float32 encoding's CPU time on one thread).
    gqa = query.shape[1] != key.shape[1]
    lengths = (cu[1:] - cu[:-1]).tolist()
    out_dtype = query.dtype
    if float32_attention(module, query):
        query, key, value = query.float(), key.float(), value.float()
    outs = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa,
        )[0].transpose(0, 1)  # (L_i, H, d)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    with torch.profiler.record_function(CAT_RANGE):  # named, so profiles can tell this cat from the model's
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.to(out_dtype).unsqueeze(0), None  # (1, total, H, d)


def float32_attention(module: nn.Module, query: torch.Tensor) -> bool:
    """Whether this packed attention call runs in float32 although its inputs are bf16/fp16.

    On a CPU without AMX, PyTorch's flash-attention backward is much slower in bf16 than in
    float32 (measured on AVX512-BF16, 96 texts of 8-128 tokens, SmolLM2's 9/3 heads: forward
    + backward 120 ms in bf16, 78 ms after casting q, k and v to float32; the forward alone
    16 vs 24 ms, so inference keeps bf16).  So in a block that trains on such a CPU, q, k
    and v go up to float32 (a (total, H, d) copy each) and the output comes back down: the
    same attention, computed more exactly, rounded to the input dtype once at the output.
    The choice rests on static facts (train mode, the block's own trainable weights), not on
    whether this call records a graph, so gradient caching's no-grad pass and its re-encoding,
    or a checkpointed block and its recompute, compute the same numbers.
    """
    return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and module.training
            and "amx_bf16" not in cpu_flags() and any(p.requires_grad for p in module.parameters()))


_state = threading.local()


def packed_mask(*args, **kwargs):
    """SDPA's mask builder, except inside a packed forward, whose kernel needs no mask.

    (Without this a sliding-window config, e.g. Mistral-7B-v0.1's, would get a dense
    (total x total) mask built for every packed row.)
    """
    if getattr(_state, "packed", False):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register ``denselm_packed`` with transformers (idempotent): attention and mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_mask)


def _config(backbone: nn.Module):
    return getattr(base_model(backbone), "config", None)  # under DDP / peft wrappers


def config_attn_implementation(backbone: nn.Module) -> str | None:
    """The attention implementation the backbone's config names right now."""
    config = _config(backbone)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def attn_implementation(backbone: nn.Module) -> str | None:
    """The attention implementation a packed forward of this backbone runs.

    ``denselm_packed`` for an ``sdpa`` backbone (whose config names it only inside
    ``attention_scope``), else the backbone's own (flash kernels, eager, ...).
    """
    impl = config_attn_implementation(backbone)
    return ATTN_IMPLEMENTATION if impl in ("sdpa", ATTN_IMPLEMENTATION) else impl


def enable(backbone: nn.Module) -> str | None:
    """Register ``denselm_packed`` with transformers; returns the implementation packed forwards will run.

    The backbone's config is not touched here: ``attention_scope`` switches it for
    each packed forward (and for its recomputation under gradient checkpointing).
    """
    register_attention()
    return attn_implementation(backbone)


def _config_tree(config) -> list:
    """The config and its sub-configs, parents before children (the order to restore them in)."""
    out = [config]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out.extend(_config_tree(sub))
    return out


def _switch_config(config) -> Callable[[], None]:
    """Name ``denselm_packed`` in the config; returns what restores every (sub-)config's old value."""
    old = [(c, c._attn_implementation) for c in _config_tree(config)]
    config._attn_implementation = ATTN_IMPLEMENTATION  # the setter also sets the sub-configs

    def restore():
        for c, impl in old:  # parents first: a parent's setter overwrites its children
            c._attn_implementation = impl

    return restore


_switch = SharedSwitch(_switch_config)


def _recompute_in_scope(backbone: nn.Module, checkpoint_fn: Callable) -> Callable:
    """A block's checkpointing function whose forward (and backward's recompute of it) runs in the scope.

    The recompute happens during ``loss.backward()``, after the packed forward's
    scope has ended; without this it would run the config's ``sdpa`` on a packed
    row and let attention cross sequence boundaries.
    """

    def checkpoint(function, *args, **kwargs):
        def in_scope(*a, **k):
            with attention_scope(backbone):
                return function(*a, **k)

        return checkpoint_fn(in_scope, *args, **kwargs)

    return checkpoint


@contextlib.contextmanager
def attention_scope(backbone: nn.Module) -> Iterator[None]:
    """Within the scope an ``sdpa`` backbone's config names ``denselm_packed``; on exit it is as before.

    Nested and concurrent scopes share one switch (the last to leave restores).  Blocks
    under gradient checkpointing get a checkpointing function that re-enters the scope
    when backward recomputes them.  A no-op for other implementations.
    """
    config = _config(backbone)
    if config is None or config_attn_implementation(backbone) not in ("sdpa", ATTN_IMPLEMENTATION):
        yield
        return
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:  # register once, keep a test's override
        register_attention()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_switch.scope(config))
        if torch.is_grad_enabled():
            try:
                layers = decoder_layers(backbone)
            except ValueError:
                layers = []
            for layer in layers:
                fn = vars(layer).get("_gradient_checkpointing_func")
                if getattr(layer, "gradient_checkpointing", False) and fn is not None:
                    stack.enter_context(swapped(layer, "_gradient_checkpointing_func",
                                                _recompute_in_scope(backbone, fn)))
        yield


def forward_packed(backbone: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Hidden states (1, total, D) of one packed row, attention confined to each sequence."""
    impl = attn_implementation(backbone)
    kwargs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids}
    if impl == ATTN_IMPLEMENTATION or impl in _FLASH_IMPLEMENTATIONS:
        cu = packed.cu_seqlens.to(packed.input_ids.device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen)
        if impl == ATTN_IMPLEMENTATION:
            # Our kernel needs no mask: an all-ones one skips transformers' packed-sequence
            # detection, and packed_mask returns None for whatever it is still asked to build.
            kwargs["attention_mask"] = torch.ones_like(packed.input_ids)
    # else: attention_mask=None and transformers derives a block-diagonal mask from position-id resets.
    # (Masks are built once per forward, not again when checkpointing recomputes a layer.)
    with attention_scope(backbone), swapped(_state, "packed", impl == ATTN_IMPLEMENTATION):
        out = backbone(**kwargs, return_dict=True, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def encode_packed(backbone: nn.Module, packed: PackedBatch, pooling: str = "last") -> torch.Tensor:
    """(N, D) pooled hidden states of one packed row."""
    positions = packed_positions(packed.cu_seqlens.to(packed.input_ids.device), packed.num_tokens, pooling)
    with last_mlp_only_at(backbone, positions):  # a no-op for a checkpointed last block in training
        hidden = forward_packed(backbone, packed)  # (1, total, D)
    return pool_packed(hidden, packed.cu_seqlens, pooling)


def encode_features(
    backbone: nn.Module,
    features: dict[str, torch.Tensor],
    pooling: str = "last",
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """A padded batch through the backbone packed, in rows of at most ``max_tokens`` real tokens. (B, D)"""
    parts = [encode_packed(backbone, p, pooling) for p in pack_rows(features, max_tokens)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
