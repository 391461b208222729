"""Memory-bounded large batches: gradient caching (Gao et al. 2021).

A plain step keeps every chunk's activation graph alive until backward, so
``sub_batch_size`` alone bounds nothing.  Gradient caching instead:

1. encodes every chunk without a graph (activations freed at once), keeping
   each chunk's RNG state so dropout can be replayed;
2. computes the loss on the detached embeddings and its gradient with respect
   to them (tiny: (B + B*G) x D);
3. when the caller runs ``loss.backward()``, re-encodes chunk by chunk with a
   graph and back-propagates ``embedding . cached_grad``; only one chunk's
   graph exists at a time.

Peak activation memory is one chunk's, whatever the batch size.  Under DDP
every chunk's backward but the last runs under ``no_sync()`` so gradients
are all-reduced once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch


def split_features(
    features: dict[str, torch.Tensor],
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Split a padded batch into consecutive chunks of at most ``max_rows`` rows
    and at most ``max_tokens`` padded tokens (rows x chunk's own length).

    Each chunk is trimmed to its own longest row (padding columns that are
    padding in every row of the chunk are dropped, on whichever side they are),
    so short chunks cost less.  Order is kept: concatenating the chunks'
    embeddings gives the batch's.
    """
    mask = features["attention_mask"]
    B, T = mask.shape
    lengths = mask.sum(dim=1).tolist()
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < B:
        end, longest = start, 0
        while end < B:
            new_longest = max(longest, int(lengths[end]))
            rows = end - start + 1
            if end > start and (
                (max_rows is not None and rows > max_rows)
                or (max_tokens is not None and rows * new_longest > max_tokens)
            ):
                break
            longest, end = new_longest, end + 1
        chunks.append((start, end))
        start = end
    return [_trim({k: v[s:e] for k, v in features.items()}) for s, e in chunks]


def _trim(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop columns that are padding in every row, at the left and right edges only."""
    mask = features["attention_mask"]
    used = mask.any(dim=0).nonzero()
    if used.numel() == 0:
        return features
    lo, hi = int(used[0]), int(used[-1]) + 1
    if lo == 0 and hi == mask.shape[1]:
        return features
    return {k: (v[:, lo:hi] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in features.items()}


@dataclass
class RandState:
    """CPU and CUDA RNG states, so a chunk's dropout masks replay exactly on re-encoding."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> "RandState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self):
        """Run the block with this state, then put the surrounding state back."""
        saved = RandState.capture()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        try:
            yield
        finally:
            torch.set_rng_state(saved.cpu)
            if saved.cuda is not None:
                torch.cuda.set_rng_state_all(saved.cuda)


@dataclass
class CachedSide:
    """One side (queries or passages) encoded without a graph."""

    chunks: list[dict[str, torch.Tensor]]
    states: list[RandState]
    reps: torch.Tensor  # (rows, D) detached leaf with requires_grad, the loss's input


def encode_without_graph(encode_fn: Callable[[dict], torch.Tensor], chunks: list[dict]) -> CachedSide:
    states, parts = [], []
    for chunk in chunks:
        states.append(RandState.capture())
        with torch.no_grad():
            parts.append(encode_fn(chunk))
    reps = torch.cat(parts, dim=0).detach().requires_grad_(True)
    return CachedSide(chunks, states, reps)


def backward_cached(
    encode_fn: Callable[[dict], torch.Tensor],
    sides: list[CachedSide],
    grads: list[torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    grad_scale: torch.Tensor | float = 1.0,
) -> None:
    """Re-encode each chunk with a graph and back-propagate its cached embedding gradient.

    ``no_sync`` (DDP's) wraps every chunk but the very last, so gradients are
    reduced once, after the last chunk's backward.
    """
    total = sum(len(side.chunks) for side in sides)
    done = 0
    for side, grad in zip(sides, grads):
        offset = 0
        for chunk, state in zip(side.chunks, side.states):
            rows = chunk["attention_mask"].shape[0]
            done += 1
            ctx = no_sync() if (no_sync is not None and done < total) else contextlib.nullcontext()
            with ctx, state.replay(), torch.enable_grad():
                reps = encode_fn(chunk)  # (rows, D)
                chunk_grad = grad[offset : offset + rows].to(reps.dtype) * grad_scale
                # d(sum(reps * g))/d(theta) = g^T d(reps)/d(theta): the chain rule through the cache.
                torch.autograd.backward(reps, grad_tensors=chunk_grad)
            offset += rows
