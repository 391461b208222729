"""Run under torchrun (2 processes, gloo): cross-device gradients equal one process's.

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/cross_device.py OUT.json

Every rank holds B_LOCAL queries and their groups; rank 0 also computes the
single-process update on the whole global batch and writes relative errors.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from denselm import BiEncoderModel  # noqa: E402
from equivalence import flat_grads, rel_err  # noqa: E402
from seed_reference import SeedBiEncoder  # noqa: E402
from tiny_models import random_batch, tiny_backbone  # noqa: E402

B_LOCAL, G = 2, 3


def variants():
    for arch in ("llama", "qwen2"):
        yield dict(arch=arch, mode="normal", teacher=False, grad_cache=False)
        yield dict(arch=arch, mode="normal", teacher=True, grad_cache=False)
    yield dict(arch="llama", mode="custom", teacher=False, grad_cache=False)
    yield dict(arch="llama", mode="normal", teacher=False, grad_cache=True)
    yield dict(arch="llama", mode="normal", teacher=True, grad_cache=True)
    yield dict(arch="qwen2", mode="normal", teacher=True, grad_cache=True, padding="right")


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    results = []
    for v in variants():
        padding = v.get("padding", "left")
        query, _ = random_batch(B_LOCAL * world, 3, 8, seed=10, padding_side=padding)
        passage, _ = random_batch(B_LOCAL * world * G, 4, 12, seed=11, padding_side=padding)
        teacher = torch.randn(B_LOCAL * world * G, generator=torch.Generator().manual_seed(12)) if v["teacher"] else None
        q_rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        p_rows = slice(rank * B_LOCAL * G, (rank + 1) * B_LOCAL * G)
        local_q = {k: t[q_rows] for k, t in query.items()}
        local_p = {k: t[p_rows] for k, t in passage.items()}

        backbone = tiny_backbone(v["arch"], dtype=torch.float64)
        model = BiEncoderModel(
            model=DDP(backbone), tokenizer=None, normalized=True, temperature=0.05,
            negatives_cross_device=True, grad_cache=v["grad_cache"], grad_cache_chunk_size=2,
        ).train()
        out = model(query=local_q, passage=local_p, messages=[v["mode"]],
                    teacher_scores=None if teacher is None else teacher[p_rows])
        out.loss.backward()
        grads = flat_grads(backbone)
        gathered = [torch.zeros_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)

        if rank == 0:
            single = tiny_backbone(v["arch"], dtype=torch.float64)
            ref_model = BiEncoderModel(model=single, tokenizer=None, normalized=True, temperature=0.05).train()
            ref = ref_model(query=query, passage=passage, messages=[v["mode"]], teacher_scores=teacher)
            ref.loss.backward()
            ref_grads = flat_grads(single)
            # The seed's own maths on the global batch (left padding only).
            seed_single = tiny_backbone(v["arch"], dtype=torch.float64)
            lq, _ = random_batch(B_LOCAL * world, 3, 8, seed=10, padding_side="left")
            lp, _ = random_batch(B_LOCAL * world * G, 4, 12, seed=11, padding_side="left")
            seed_loss = SeedBiEncoder(seed_single, normlized=True, temperature=0.05)(
                lq, lp, [v["mode"]], None if teacher is None else teacher.tolist())[0]
            seed_loss.backward()
            results.append({
                **v,
                "world_size": world,
                "grad_rel_err_vs_single_process": rel_err(grads, ref_grads),
                "grad_rel_err_vs_seed_single_process": rel_err(grads, flat_grads(seed_single)),
                "ranks_agree_rel_err": max(rel_err(g, gathered[0]) for g in gathered),
                "loss": float(out.loss), "single_process_loss": float(ref.loss),
                "loss_rel_err": rel_err(out.loss.detach(), ref.loss.detach()),
            })
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    # rank 0 computes the single-process references alone: rank 1 must not tear gloo down meanwhile
    # (seen under load: SIGABRT in rank 1, as in cross_device_options.py)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
