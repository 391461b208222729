"""Compute the frozen bottom of the network once per distinct text.

With LoRA on the top ``k`` of ``L`` blocks (``model.lora.top_layers``), blocks
``0 .. L-k-1`` and the embeddings never change during training, and causal
attention makes a text's hidden states independent of the other texts in the
batch.  So the hidden states entering block ``L-k`` are a pure function of the
text's token ids: compute them the first time a text is seen, keep them, and
from then on run only the top ``k`` blocks.  Training data repeats texts (a
passage is a positive once and a hard negative many times; every epoch repeats
everything), so after the first pass a step costs ``k`` blocks forward and
backward instead of ``L`` forward and ``k`` backward.

How the top-only forward is run without touching the model's code: while a
batch is served, the frozen blocks' ``forward`` is swapped (``common.swapped_forwards``,
restored on exit) for a pass-through
and the last frozen block returns the cached states (scattered into the
batch's layout: padded ``(B, T, D)`` by the attention mask, or a packed
``(1, n, D)`` row).  The model's own code still builds masks and rotary tables,
and the first trainable block receives the cached tensor as its real input, so
gradient checkpointing saves and recomputes it correctly.

Requirements (checked): every parameter below block ``L-k`` is frozen (no
trainable embedding rows), and positions do not depend on the batch
(``position_ids="from_zero"``, which packing implies).  Frozen blocks must be
deterministic (no dropout in the base model: true of every decoder config we
know; LoRA dropout lives in the trainable blocks).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..backbone import decoder_layers
from .common import swapped_forwards

logger = logging.getLogger(__name__)


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


class FrozenPrefixCache:
    """Hidden states entering the first trainable block, by text (its real token ids).

    ``backbone``: the transformers decoder (or the peft model around it) that the
    bi-encoder calls; ``num_frozen``: blocks below the first trainable one;
    ``max_bytes``: memory the cache may use (texts beyond it are computed every time).
    """

    def __init__(self, backbone: nn.Module, num_frozen: int, max_bytes: int = 8 << 30):
        layers = decoder_layers(backbone)
        if not 1 <= num_frozen < len(layers):
            raise ValueError(f"num_frozen must be between 1 and {len(layers) - 1}, got {num_frozen}")
        self.backbone = backbone
        self.layers = layers
        self.num_frozen = num_frozen
        self.max_bytes = int(max_bytes)
        self._store: dict[bytes, torch.Tensor] = {}
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self._warned_full = False
        self._check_frozen()

    def _check_frozen(self) -> None:
        """Every trainable parameter must live in the blocks above the cached ones."""
        frozen_ids = {id(p) for layer in self.layers[: self.num_frozen] for p in layer.parameters()}
        embeddings = self.backbone.get_input_embeddings()
        embedding_ids = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
        for name, param in self.backbone.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in frozen_ids:
                raise ValueError(f"parameter {name} is trainable but lies in a cached (frozen) block")
            if id(param) in embedding_ids:
                raise ValueError(
                    f"parameter {name} (input embeddings) is trainable, so the bottom blocks are not frozen; "
                    "the frozen-prefix cache needs templates without added trainable tokens"
                )
        # peft's trainable token rows live in a wrapper module next to embed_tokens.
        for name, module in self.backbone.named_modules():
            if "trainable_tokens" in type(module).__name__.lower() and any(
                p.requires_grad for p in module.parameters()
            ):
                raise ValueError(f"{name} holds trainable token embeddings below the cached blocks")

    # ------------------------------------------------------------------ lookup
    @staticmethod
    def _keys(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[bytes], list[int]]:
        """One key per row: the bytes of its real token ids (padding side does not matter)."""
        ids = input_ids.detach().to("cpu", torch.int64)
        real = mask.detach().to("cpu").bool()
        lengths = real.sum(dim=1).tolist()
        flat = ids[real].numpy()
        keys, start = [], 0
        for n in lengths:
            keys.append(flat[start: start + n].tobytes())
            start += n
        return keys, lengths

    def _compute(self, input_ids: torch.Tensor, mask: torch.Tensor, rows: list[int],
                 packed: bool = False, max_tokens: int | None = None) -> list[torch.Tensor]:
        """Hidden states entering block ``num_frozen`` for the given rows: list of (len_i, D).

        ``packed``: compute them in packed rows of at most ``max_tokens`` real tokens (None: one
        row), as the model's own packed forward would; else in one padded batch.
        """
        sub_ids, sub_mask = input_ids[rows], mask[rows].to(torch.long)
        captured: list[torch.Tensor] = []

        def capture(hidden_states, *args, **kwargs):
            # The input of block num_frozen, (M, T, D) or a packed (1, n, D); it and the blocks
            # above pass it through, so the rest of the forward costs only the final norm.
            captured.append(hidden_states.detach())
            return hidden_states

        above = self.layers[self.num_frozen:]
        forwards = {above[0]: capture, **{layer: _pass_through for layer in above[1:]}}
        out: list[torch.Tensor] = []
        with swapped_forwards(forwards), torch.no_grad():
            if packed:
                # Padding-free, like the model's own packed forward: in a demo step of 96 short
                # texts the padded frozen forward was a third of the step (benchmarks/RESULTS.md).
                from . import packing

                for row in packing.pack_rows({"input_ids": sub_ids, "attention_mask": sub_mask}, max_tokens):
                    captured.clear()
                    packing.forward_packed(self.backbone, row)
                    if captured:
                        out.extend(h.clone() for h in packing.unpack(captured[0], row.cu_seqlens))
            else:
                positions = (sub_mask.cumsum(dim=1) - 1).clamp(min=0)  # from zero: the policy the cache requires
                self.backbone(input_ids=sub_ids, attention_mask=sub_mask, position_ids=positions, use_cache=False)
                if captured:
                    real = sub_mask.bool()
                    out = [captured[0][i][real[i]].clone() for i in range(len(rows))]
        if len(out) != len(rows):
            raise RuntimeError("the frozen-prefix cache could not capture the hidden states of block "
                               f"{self.num_frozen} (the model never called it)")
        return out

    def lookup(self, input_ids: torch.Tensor, mask: torch.Tensor, packed: bool = False,
               max_tokens: int | None = None) -> torch.Tensor:
        """(total real tokens, D): the batch's cached hidden states, real tokens row after row.

        ``packed``: compute the missing ones in packed rows of at most ``max_tokens`` tokens."""
        keys, lengths = self._keys(input_ids, mask)
        found: list[torch.Tensor | None] = [self._store.get(k) for k in keys]
        missing = [i for i, h in enumerate(found) if h is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            # Duplicates inside one batch are computed once.
            first: dict[bytes, int] = {}
            unique = [i for i in missing if first.setdefault(keys[i], i) == i]
            for i, h in zip(unique, self._compute(input_ids, mask, unique, packed, max_tokens)):
                found[i] = h
                self._remember(keys[i], h)
            for i in missing:
                if found[i] is None:
                    found[i] = found[first[keys[i]]]
        return torch.cat(found, dim=0)

    def _remember(self, key: bytes, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size() + len(key)
        if self.bytes_used + size > self.max_bytes:
            if not self._warned_full:
                logger.warning("frozen-prefix cache full (%.2f GB): further texts are computed every time",
                               self.bytes_used / 1e9)
                self._warned_full = True
            return
        self._store[key] = hidden
        self.bytes_used += size

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"prefix_cache_texts": len(self._store), "prefix_cache_gb": self.bytes_used / 1e9,
                "prefix_cache_hit_rate": self.hits / total if total else 0.0}

    # ------------------------------------------------------------------ serving
    @contextlib.contextmanager
    def serving(self, features: dict[str, torch.Tensor], packed: bool, max_tokens: int | None = None):
        """Within this context the backbone runs only its trainable top blocks on this batch.

        ``packed``: the backbone will be called on packed rows (1, n) of the batch's real
        tokens in order (texts seen for the first time are computed packed too, in rows of at
        most ``max_tokens``); otherwise once on the padded (B, T) batch.
        """
        mask = features["attention_mask"]
        flat = self.lookup(features["input_ids"], mask, packed, max_tokens)  # (total, D)
        state = {"offset": 0}

        def feed(hidden_states, *args, **kwargs):
            # hidden_states: what the pass-through blocks forwarded (the embeddings), (b, t, D).
            b, t = hidden_states.shape[:2]
            real = mask.bool() if not packed else torch.ones(b, t, dtype=torch.bool, device=flat.device)
            if real.shape != (b, t):
                raise RuntimeError(f"frozen-prefix cache: batch layout {tuple(real.shape)} != hidden states {(b, t)}")
            count = int(real.sum())
            chunk = flat[state["offset"]: state["offset"] + count]
            state["offset"] += count
            out = torch.zeros(b, t, flat.shape[-1], dtype=flat.dtype, device=hidden_states.device)
            out[real.to(out.device)] = chunk
            return out

        frozen = self.layers[: self.num_frozen]
        with swapped_forwards({**{layer: _pass_through for layer in frozen[:-1]}, frozen[-1]: feed}):
            yield
        if state["offset"] != flat.shape[0]:
            raise RuntimeError(f"frozen-prefix cache: served {state['offset']} of {flat.shape[0]} cached tokens")
