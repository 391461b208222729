"""Peak memory of one training step: plain autograd, the seed's sub_batch_size, gradient caching.

    python benchmarks/memory_bench.py                 # 64 x 8, tiny Qwen2-style config; grad cache at 64, 128, 256 queries
    python benchmarks/memory_bench.py --size tiny     # smoke test (8 short queries x 8)
    python benchmarks/memory_bench.py --model cpu     # the speed benchmark's CPU config (plain step ~14 GB)
    python benchmarks/memory_bench.py --queries 64 --grad-cache-batches 64,128,256 --chunk 16

Every variant runs in a fresh process: the model and one synthetic batch (queries
16-64 tokens, passages lognormal median 160 capped at 256) are built, the
RSS high-water mark is reset (Linux ``/proc/self/clear_refs``), one step runs
(forward, backward, AdamW) and the mark is read.  Reported: ``before_step_mb``
(RSS holding interpreter, libraries, model, optimizer and batch), ``peak_mb``
(high-water mark during the step) and ``step_mb`` = peak - before (what the
step itself needs; the padded batch tensors are built before it).  On CUDA the same with ``torch.cuda.max_memory_allocated``.
All variants use the same BiEncoderModel (LoRA r16, padded batches, no
packing) so that only the memory strategy differs.

Targets (issue 2): gradient caching at most 35% of the plain step's peak at
64 x 8, and flat within 10% from 64 to 256 queries at a fixed chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

import bench_lib as bl


def child(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_name = args.model
    data = bl.DataSpec(passage_cap=args.passage_cap, vocab=bl.CONFIGS[model_name]["vocab_size"])
    if args.size == "tiny":
        data = bl.DataSpec(query_len=(4, 12), passage_median=24, passage_min=4, passage_cap=64, vocab=512)
    backbone = bl.build_backbone(model_name, device, dtype, lora_rank=args.lora_rank)
    variant = args.child
    kw = {"packing": False}
    if variant == "sub_batch":
        kw["sub_batch_size"] = args.chunk
    elif variant == "grad_cache":
        kw["grad_cache_rows"] = args.chunk
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}")
    model = bl.denselm_model(backbone, **kw)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-5)
    q, p = bl.train_batch(100, args.batch, args.group, data)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    # The collated batch (right-padded, as denselm's collator makes it) exists before the step.
    q_feats, p_feats = bl.padded(q, "right", device), bl.padded(p, "right", device)
    with bl.PeakMemory(device) as mem:
        with autocast:
            loss = model(query=q_feats, passage=p_feats, messages=["normal"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    bl.log(stage="memory", variant=variant, queries=args.batch, group=args.group, chunk=args.chunk if variant != "plain" else None,
           model=model_name, real_tokens=sum(len(s) for s in q + p), loss=round(float(loss.detach()), 4), **mem.record())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("default", "tiny"), default="default")
    ap.add_argument("--model", default="tiny", choices=sorted(bl.CONFIGS),
                    help="tiny: Qwen2-style hidden 64, 2 layers (default); cpu: hidden 256, 4 layers (plain 64 x 8 needs ~14 GB)")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=16, help="rows per sub-batch / gradient-cache chunk")
    ap.add_argument("--grad-cache-batches", default="64,128,256", help="query counts for the flatness check")
    ap.add_argument("--passage-cap", type=int, default=256)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.size == "tiny":
        args.queries, args.chunk, args.grad_cache_batches = 8, 4, "8,16"
    common = ["--size", args.size, "--model", args.model, "--group", str(args.group), "--chunk", str(args.chunk),
              "--passage-cap", str(args.passage_cap), "--lora-rank", str(args.lora_rank), "--threads", str(args.threads)]
    if args.device:
        common += ["--device", args.device]
    runs = [("plain", args.queries), ("sub_batch", args.queries)]
    runs += [("grad_cache", int(b)) for b in args.grad_cache_batches.split(",")]
    results = {}
    for variant, batch in runs:
        for rec in bl.run_child(os.path.abspath(__file__), common + ["--child", variant, "--batch", str(batch)]):
            bl.log(**rec)
            results[(variant, batch)] = rec
    plain = results[("plain", args.queries)]
    gc = [results[("grad_cache", int(b))] for b in args.grad_cache_batches.split(",")]
    same = results.get(("grad_cache", args.queries))
    summary = {"stage": "memory", "summary": "grad cache vs plain"}
    if same is not None:
        summary.update(peak_ratio=round(same["peak_mb"] / plain["peak_mb"], 3),
                       step_ratio=round(same["step_mb"] / plain["step_mb"], 3))
    summary.update(grad_cache_peak_growth=round(max(r["peak_mb"] for r in gc) / min(r["peak_mb"] for r in gc) - 1, 3),
                   grad_cache_step_growth=round(max(r["step_mb"] for r in gc) / min(r["step_mb"] for r in gc) - 1, 3),
                   sub_batch_peak_ratio=round(results[("sub_batch", args.queries)]["peak_mb"] / plain["peak_mb"], 3))
    bl.log(**summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
