"""Same-dataset global batches, groups, in-context example choice, rank slices, false negatives.

Every random choice is a pure function of its coordinates, never of a
generator's history, so a resumed run, a DataLoader worker or another rank
recomputes exactly the same thing:

- which examples a dataset keeps under a cap: ``(seed, CAP, dataset)``
- the order of an epoch's batches: ``(seed, ORDER, epoch)``
- the positive, negatives and in-context examples of the k-th query of a
  global batch: ``(seed, GROUP, epoch, step, k)``

The rank never enters: every rank draws the whole global batch's choices (cheap,
text only), tokenizes its own slice and builds the false-negative mask over
the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

# stream tags: keep them distinct so the streams never collide
CAP, ORDER, GROUP = 1, 2, 3


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by (seed, *keys) alone (SeedSequence hashes the tuple)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(k) for k in keys)]))


# --- datasets -> batches ---------------------------------------------------------------------------


def cap_indices(num_examples: int, cap: int | None, seed: int, dataset: int) -> np.ndarray:
    """Example indices kept by the cap: a random subset fixed for the run (sorted), or all."""
    if cap is None or cap >= num_examples:
        return np.arange(num_examples, dtype=np.int64)
    keep = rng_for(seed, CAP, dataset).choice(num_examples, size=cap, replace=False)
    return np.sort(keep).astype(np.int64)


@dataclass(frozen=True)
class DatasetPlan:
    """What the sampler needs of one dataset."""

    indices: np.ndarray
    """(n,) example indices kept after the cap."""
    batch_size: int
    """Global batch size (queries across all ranks) for this dataset."""
    weight: float = 1.0
    """Epoch multiplier: whole passes for the integer part, a random subset for the fraction."""


def _passes(plan: DatasetPlan) -> tuple[int, int]:
    """(full passes, examples in the partial pass) per epoch."""
    n = len(plan.indices)
    full = int(math.floor(plan.weight))
    partial = int(math.floor((plan.weight - full) * n + 0.5))
    return full, partial


def batches_per_epoch(plan: DatasetPlan) -> int:
    """Complete batches this dataset contributes to each epoch (incomplete ones are dropped)."""
    full, partial = _passes(plan)
    return full * (len(plan.indices) // plan.batch_size) + partial // plan.batch_size


def epoch_batches(plans: Sequence[DatasetPlan], seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The epoch's global batches, shuffled across datasets: [(dataset, (batch_size,) indices)].

    As the seed: each dataset is shuffled, cut into complete batches of its own
    global batch size (the remainder dropped), then all batches are shuffled
    together, so a batch never mixes datasets.  Each pass is cut separately, so
    with a weight above 1 no batch holds the same example twice.
    """
    rng = rng_for(seed, ORDER, epoch)
    batches: list[tuple[int, np.ndarray]] = []
    for d, plan in enumerate(plans):
        full, partial = _passes(plan)
        bs = plan.batch_size
        sizes = [len(plan.indices)] * full + ([partial] if partial >= bs else [])
        for size in sizes:
            order = rng.permutation(plan.indices)[:size]
            batches.extend((d, order[s : s + bs]) for s in range(0, size - bs + 1, bs))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def rank_slice(global_batch_size: int, world_size: int, rank: int) -> slice:
    """This rank's queries of a global batch: equal contiguous slices (the seed's split)."""
    if global_batch_size % world_size:
        raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    local = global_batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


# --- groups and in-context examples ------------------------------------------------------------------


def group_rng(seed: int, epoch: int, step: int, k: int) -> np.random.Generator:
    """The generator of the k-th query of global batch ``step`` of ``epoch``."""
    return rng_for(seed, GROUP, epoch, step, k)


def sample_group(num_pos: int, num_neg: int, group_size: int, rng: np.random.Generator) -> tuple[int, list[int], bool]:
    """(positive index, group_size - 1 negative indices, whether negatives were repeated).

    As the seed: one positive at random; with fewer negatives than needed the
    list is repeated ceil((group_size - 1) / n) times, then group_size - 1 are
    drawn without replacement (so each negative appears at most that often).
    """
    pos = int(rng.integers(num_pos))
    need = group_size - 1
    if need == 0:
        return pos, [], False
    if num_neg == 0:
        raise ValueError(f"group size {group_size} needs negatives, example has none")
    repeated = num_neg < need
    pool = np.tile(np.arange(num_neg), math.ceil(need / num_neg)) if repeated else np.arange(num_neg)
    negs = rng.choice(pool, size=need, replace=False)
    return pos, [int(x) for x in negs], repeated


def sample_icl(
    k: int, query_keys: Sequence[Hashable], max_examples: int, rng: np.random.Generator
) -> list[int]:
    """Positions (in the global batch) of query k's in-context examples, in prompt order.

    As the seed: the count is uniform in 0..max_examples and the examples are
    other pairs of the same batch; never query k's own pair, nor a pair whose
    query text equals query k's.
    """
    n = int(rng.integers(0, max_examples + 1)) if max_examples > 0 else 0
    if n == 0:
        return []
    pool = [j for j, key in enumerate(query_keys) if j != k and key != query_keys[k]]
    n = min(n, len(pool))
    if n == 0:
        return []
    return [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]


# --- false negatives ----------------------------------------------------------------------------------


def false_negative_mask(passage_keys: Sequence[Hashable], group_size: int, rows: Sequence[int]) -> np.ndarray:
    """(len(rows), P) bool: passage j is identical to query i's positive and is not that positive.

    ``passage_keys`` are the P = B_global * group_size passages of the global
    batch in group order (query q's positive at q * group_size); ``rows`` are
    global query indices (this rank's slice).  Such passages must not count as
    negatives for query i: their score equals the positive's.
    """
    codes: dict[Hashable, int] = {}
    coded = np.fromiter((codes.setdefault(k, len(codes)) for k in passage_keys), dtype=np.int64,
                        count=len(passage_keys))
    rows = np.asarray(rows, dtype=np.int64)
    own = rows * group_size
    mask = coded[None, :] == coded[own][:, None]
    mask[np.arange(len(rows)), own] = False
    return mask
