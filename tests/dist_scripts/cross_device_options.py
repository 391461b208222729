"""Run under torchrun (2 processes, gloo): with issue 13's loss options, cross-device gradients
and losses equal one process holding the global batch.

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/cross_device_options.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from denselm import BiEncoderModel, losses  # noqa: E402
from equivalence import flat_grads, rel_err  # noqa: E402
from tiny_models import random_batch, tiny_backbone  # noqa: E402

B_LOCAL, G = 2, 3
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
OPTIONS = {
    "margin": dict(margin=0.0),
    "teacher_margin": dict(teacher_margin=0.3),
    "gte_joint": dict(directions=ALL),
    "symmetric_per_direction": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "hardness": dict(hardness_mode="all_negatives", hardness_strength=5.0),
    "everything": dict(margin=0.0, teacher_margin=0.3, directions=ALL, hardness_mode="in_batch_negatives",
                       hardness_strength=9.0),
}


def variants():
    for name in OPTIONS:
        yield dict(options=name, grad_cache=False)
    yield dict(options="everything", grad_cache=True)
    yield dict(options="margin", grad_cache=True)
    # embedding distillation (teacher width 5): projection and similarity-matrix terms
    yield dict(options="margin", grad_cache=False, distill=(1.0, 1.0))
    yield dict(options="gte_joint", grad_cache=True, distill=(0.5, 2.0))
    # listwise (KL) in-batch similarity distillation, plain and gradient-cached
    yield dict(options="margin", grad_cache=False, distill=(0.0, 1.0), kind="kl")
    yield dict(options="gte_joint", grad_cache=True, distill=(0.5, 2.0), kind="kl")


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    results = []
    n_q, n_p = B_LOCAL * world, B_LOCAL * world * G
    for v in variants():
        opts = losses.LossOptions(**OPTIONS[v["options"]])
        query, _ = random_batch(n_q, 3, 8, seed=10)
        passage, _ = random_batch(n_p, 4, 12, seed=11)
        teacher = torch.randn(n_p, generator=torch.Generator().manual_seed(12))
        duplicate = torch.zeros(n_q, n_p, dtype=torch.bool)
        duplicate[0, 3 * G] = True  # another rank's positive duplicates query 0's
        duplicate[3, 1] = True
        teacher_emb = torch.randn(n_q + n_p, 5, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
        tq, tp = teacher_emb[:n_q], teacher_emb[n_q:]
        q_rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        p_rows = slice(rank * B_LOCAL * G, (rank + 1) * B_LOCAL * G)

        backbone = tiny_backbone("llama", dtype=torch.float64)
        model = BiEncoderModel(
            model=DDP(backbone), tokenizer=None, normalized=True, temperature=0.05, negatives_cross_device=True,
            grad_cache=v["grad_cache"], grad_cache_chunk_size=2, loss_options=opts,
        ).train()
        distill = v.get("distill")
        kind_kw = {"similarity_kind": v["kind"], "teacher_temperature": 0.1} if "kind" in v else {}
        if distill:
            torch.manual_seed(3)
            model.enable_embedding_distillation(5, *distill, **kind_kw).double()
        out = model(query={k: t[q_rows] for k, t in query.items()}, passage={k: t[p_rows] for k, t in passage.items()},
                    messages=["normal"], teacher_scores=teacher[p_rows], false_negative_mask=duplicate[q_rows],
                    teacher_embeddings=(tq[q_rows], tp[p_rows]) if distill else None)
        out.loss.backward()
        if distill:  # the head is outside DDP: train.py averages its gradient the same way
            from denselm import distributed as denselm_dist

            denselm_dist.all_reduce_grads_mean(model.embed_distill.parameters())
        grads = flat_grads(backbone)
        if distill and distill[0] > 0:  # the projection head exists only with an embedding term
            grads = torch.cat([grads, flat_grads(model.embed_distill)])
        gathered = [torch.zeros_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        # masked fractions: every rank has as many negatives, so the mean over ranks is the global fraction
        fractions = {k: torch.tensor(v_, dtype=torch.float64) for k, v_ in out.metrics.items() if k.startswith("masked/")}
        for t in fractions.values():
            dist.all_reduce(t)

        if rank == 0:
            single = tiny_backbone("llama", dtype=torch.float64)
            ref_model = BiEncoderModel(model=single, tokenizer=None, normalized=True, temperature=0.05,
                                       loss_options=opts).train()
            if distill:
                torch.manual_seed(3)
                ref_model.enable_embedding_distillation(5, *distill, **kind_kw).double()
            ref = ref_model(query=query, passage=passage, messages=["normal"], teacher_scores=teacher,
                            false_negative_mask=duplicate, teacher_embeddings=(tq, tp) if distill else None)
            ref.loss.backward()
            ref_grads = flat_grads(single)
            if distill and distill[0] > 0:
                ref_grads = torch.cat([ref_grads, flat_grads(ref_model.embed_distill)])
            results.append({
                **v,
                "world_size": world,
                "grad_rel_err_vs_single_process": rel_err(grads, ref_grads),
                "ranks_agree_rel_err": max(rel_err(g, gathered[0]) for g in gathered),
                "loss_rel_err": rel_err(out.loss.detach(), ref.loss.detach()),
                "masked_fraction_abs_err": max([abs(float(t) / world - ref.metrics[k]) for k, t in fractions.items()],
                                               default=0.0),
                "masked": {k: ref.metrics[k] for k in fractions},
            })
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    # rank 0 computes the single-process reference alone: rank 1 must not tear gloo down meanwhile
    # (seen: 'terminate called without an active exception', SIGABRT in rank 1, about 1 run in 6)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
