"""Rank info, process-group set-up and the tensor collectives of the loss (gathering with gradients).

Wrapping the model for N processes, unwrapping it and its full state dicts are ``denselm.parallel``'s.

Cross-device negatives, done right.  Each rank r holds B queries and B * G
passages.  We all-gather passages *with autograd* (the backward of
``torch.distributed.nn.functional.all_gather`` sums every rank's gradient for
this rank's slice) and score only this rank's queries against all W * B * G
passages, taking the mean over the local B queries.  Then

    sum_r d(loss_r)/d(theta) = W * d(L_global)/d(theta),

and DDP's averaging divides by W: the update equals one process holding the
whole global batch.  The peers that compute the global loss on every rank
after a plain gather get 1/W of that (REFERENCE.md).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(backend: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the default group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    if is_initialized():
        return info()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on all ranks) along dim 0, keeping gradients.

    Raises a ValueError naming the shapes when ranks disagree (all_gather
    would otherwise hang or fail obscurely).
    """
    if not is_initialized():
        raise ValueError("negatives_cross_device=True needs an initialised torch.distributed process group")
    world = dist.get_world_size()
    if world == 1:
        return t
    check_same_shape(t, "embeddings")
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t.contiguous()), dim=0)


def check_same_shape(t: torch.Tensor, what: str) -> None:
    """Every rank must hold the same shape; gather the shapes (cheap) and compare."""
    world = dist.get_world_size()
    shape = torch.tensor(list(t.shape) + [0] * (4 - t.dim()), dtype=torch.long)
    if dist.get_backend() == "nccl":
        shape = shape.cuda()
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    got = [tuple(s[: t.dim()].tolist()) for s in shapes]
    if len(set(got)) != 1:
        raise ValueError(
            f"cross-device negatives need the same number of queries and passages on every rank; "
            f"{what} shapes per rank: {got}"
        )


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a detached scalar (for logging the global loss)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return value.detach()
    v = value.detach().clone().to(torch.promote_types(value.dtype, torch.float32))
    if dist.get_backend() == "nccl":
        v = v.cuda()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return (v / dist.get_world_size()).to(value.device)


def all_reduce_grads_mean(params) -> None:
    """Average gradients over ranks for parameters outside DDP (e.g. a loss's own projection)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= dist.get_world_size()
