"""Training and encoding speed: the seed's way against denselm's, side by side, interleaved.

    python benchmarks/speed_bench.py                          # CPU (the issue's Qwen2-style config, fp32)
    python benchmarks/speed_bench.py --size tiny              # smoke test (seconds)
    python benchmarks/speed_bench.py --stages train,encode    # pick stages
    python benchmarks/speed_bench.py                          # on a CUDA machine: the GPU stages (below)

One JSON line per measurement, flushed at once (a timeout keeps what was done).
Same synthetic token data for every variant (fixed seed): queries of 16-64
tokens, passages lognormal with median 160, capped at 512 (256 on CPU).

The seed's way: left-padded to the batch maximum, hidden state at position -1,
plain autograd (``--seed-sub-batch`` for its sub_batch_size chunks), fixed-size
unsorted encoding batches.  denselm's way: ``BiEncoderModel(packing=True)``
(padding-free rows, attention confined to each sequence), gradient caching
where memory needs it, and ``inference.Encoder`` (length-sorted, token-budget
batches, packed).  Training is LoRA r16 on every linear layer + AdamW.

Stages
  CPU: matmul, train, encode, memory (peak RSS of one training step per variant, fresh process each)
  GPU: matmul, qwen-train, qwen-encode, mistral-train, mistral-encode, mistral-1024
       (Qwen2.5-0.5B and Mistral-7B real configs, random init, bf16, LoRA, gradient
       checkpointing; GPU peak memory is torch.cuda.max_memory_allocated of each timed step)

Throughput is real (non-pad) tokens per second.  MFU/HFU: see bench_lib.FORMULA
(printed in the first line).  On a shared CPU the wall clock counts other
processes' turns; with one thread (the default here) this thread's CPU time
counts our work alone: both are reported (``*_wall`` and ``*_cpu``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import bench_lib as bl

STAGES_CPU = ("matmul", "train", "encode", "memory")
STAGES_GPU = ("matmul", "qwen-train", "qwen-encode", "mistral-train", "mistral-encode", "mistral-1024")


@dataclass
class TrainSpec:
    model: str
    queries: int
    group: int
    variants: tuple[str, ...] = ("seed", "denselm")
    reps: int = 3
    warmup: int = 1
    lora_rank: int = 16
    checkpointing: bool = False
    grad_cache_tokens: int = 8192
    """Gradient-cache chunk budget (padded tokens) for the "denselm-gc" variant."""
    packing_max_tokens: int = 4096
    data: bl.DataSpec = field(default_factory=bl.DataSpec)


@dataclass
class EncodeSpec:
    model: str
    docs: int
    seed_batch: int
    variants: tuple[str, ...] = ("seed-unsorted", "seed-sorted", "denselm-padded", "denselm")
    reps: int = 3
    encoder_batch: int = 64
    encoder_max_tokens: int = 16384
    packing_max_tokens: int = 4096
    data: bl.DataSpec = field(default_factory=bl.DataSpec)


def cpu_specs(size: str) -> dict:
    if size == "tiny":
        data = bl.DataSpec(query_len=(4, 12), passage_median=24, passage_min=4, passage_cap=64, vocab=512)
        return {
            "train": TrainSpec("tiny", 4, 4, variants=("seed", "denselm", "denselm-gc"), reps=1, warmup=1,
                               lora_rank=4, grad_cache_tokens=256, packing_max_tokens=128, data=data),
            "encode": EncodeSpec("tiny", 40, 8, reps=1, encoder_batch=16, encoder_max_tokens=512,
                                 packing_max_tokens=256, data=data),
        }
    data = bl.DataSpec(passage_cap=256)
    return {
        "train": TrainSpec("cpu", 16, 8, variants=("seed", "denselm", "denselm-gc"), data=data),
        "encode": EncodeSpec("cpu", 512, 64, reps=5, data=data),
    }


def gpu_specs() -> dict:
    data = bl.DataSpec(passage_cap=512)
    return {
        # REFERENCE.md anchors: Qwen2.5-0.5B 32 x 8 with checkpointing, 24.5k tok/s seed-style.
        "qwen-train": TrainSpec("qwen2.5-0.5b", 32, 8, checkpointing=True, packing_max_tokens=16384, data=data),
        "qwen-encode": EncodeSpec("qwen2.5-0.5b", 8192, 128, reps=2, encoder_batch=1024,
                                  encoder_max_tokens=65536, packing_max_tokens=32768, data=data),
        # Mistral-7B 16 x 8: 3.9k tok/s, 55 GiB seed-style.
        "mistral-train": TrainSpec("mistral-7b", 16, 8, checkpointing=True, packing_max_tokens=16384, data=data),
        "mistral-encode": EncodeSpec("mistral-7b", 2048, 64, variants=("seed-unsorted", "seed-sorted", "denselm"),
                                     reps=1, encoder_batch=1024, encoder_max_tokens=32768,
                                     packing_max_tokens=16384, data=data),
        # One 1024 x 8 optimizer step with gradient caching, timed once after a 16 x 8 warm-up.
        "mistral-1024": TrainSpec("mistral-7b", 1024, 8, variants=("denselm-gc",), reps=1, warmup=1,
                                  checkpointing=True, grad_cache_tokens=65536, packing_max_tokens=16384, data=data),
    }


# ------------------------------------------------------------------- train
class Trainer:
    """The variants' training steps over one shared LoRA backbone (weights do not affect speed)."""

    def __init__(self, spec: TrainSpec, device, dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.backbone = bl.build_backbone(spec.model, device, dtype, spec.lora_rank, spec.checkpointing)
        self.shape = bl.model_shape(spec.model)
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.seed = bl.SeedStep(self.backbone, sub_batch_size=SEED_SUB_BATCH)
        self.models = {}

    def autocast(self):
        import contextlib

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, variant: str, q, p) -> None:
        with self.autocast():
            if variant == "seed":
                loss = self.seed.loss(q, p, self.device)
            else:
                if variant not in self.models:
                    gc = self.spec.grad_cache_tokens if variant == "denselm-gc" else None
                    self.models[variant] = bl.denselm_model(self.backbone, grad_cache_tokens=gc,
                                                            packing_max_tokens=self.spec.packing_max_tokens)
                loss = bl.denselm_loss(self.models[variant], q, p, self.device)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self, variant: str, q, p) -> tuple[float, float, float]:
        """(model FLOPs, hardware FLOPs, padding fraction) of one step."""
        real = [len(s) for s in q + p]
        extra = int(self.spec.checkpointing)
        if variant == "seed":
            executed = bl.SeedStep.executed_lengths(q, p, SEED_SUB_BATCH)
        else:
            executed = real
            extra += int(variant == "denselm-gc")
        model, hardware = bl.step_flops(real, executed, self.shape, train=True, extra_forwards=extra)
        return model, hardware, 1.0 - sum(real) / sum(executed)


def run_train(name: str, spec: TrainSpec, device, dtype, rate: dict) -> None:
    trainer = Trainer(spec, device, dtype)
    batches = [bl.train_batch(100 + i, spec.queries, spec.group, spec.data) for i in range(max(spec.reps, 1))]
    warm_q = min(spec.queries, 16)
    warm = bl.train_batch(99, warm_q, spec.group, spec.data)
    for variant in spec.variants:
        for _ in range(spec.warmup):
            trainer.step(variant, *warm)
    times = {v: [] for v in spec.variants}
    peaks = {v: [] for v in spec.variants}
    for rep in range(spec.reps):  # interleaved: each variant once per round, same batch
        for variant in spec.variants:
            with bl.PeakMemory(device) as mem, bl.Clock(device) as clock:
                trainer.step(variant, *batches[rep])
            times[variant].append((clock.wall, clock.cpu))
            peaks[variant].append(mem.peak)
    results = {}
    for variant in spec.variants:
        q, p = batches[0]
        real_tokens = sum(len(s) for s in q + p)
        stats = [trainer.flops(variant, *b) for b in batches[: spec.reps]]
        rec = summarise(times[variant], [s[0] for s in stats], [s[1] for s in stats],
                        [sum(len(s) for s in b[0] + b[1]) for b in batches[: spec.reps]], rate)
        rec.update(stage=name, variant=variant, model=spec.model, batch=f"{spec.queries}x{spec.group}",
                   real_tokens_per_step=real_tokens, padding_fraction=round(float(np.mean([s[2] for s in stats])), 3),
                   reps=spec.reps, lora_rank=spec.lora_rank, checkpointing=spec.checkpointing,
                   grad_cache_tokens=spec.grad_cache_tokens if variant == "denselm-gc" else None)
        if device.type == "cuda":
            rec.update(memory_method="cuda_max_memory_allocated (in-process, reset per step)",
                       peak_mb=round(max(peaks[variant]), 1))
        results[variant] = rec
        bl.log(**rec)
    log_speedups(name, results, "seed")


def summarise(times, model_flops, hw_flops, real_tokens, rate) -> dict:
    """Medians over repetitions of tokens/s, MFU and HFU, by wall clock and by thread CPU time."""
    rec = {}
    for i, clock in enumerate(("wall", "cpu")):
        secs = [t[i] for t in times]
        if clock == "cpu" and (torch.cuda.is_available() or torch.get_num_threads() != 1):
            continue  # thread CPU time only measures the work with one CPU thread
        rates = [n / s for n, s in zip(real_tokens, secs)]
        rec[f"seconds_{clock}"] = round(statistics.median(secs), 4)
        rec[f"real_tokens_per_s_{clock}"] = round(statistics.median(rates), 1)
        rec[f"real_tokens_per_s_{clock}_reps"] = [round(r, 1) for r in rates]
        denom = rate[f"flops_per_s_{clock}"]
        rec[f"mfu_{clock}"] = round(statistics.median([f / s / denom for f, s in zip(model_flops, secs)]), 4)
        rec[f"hfu_{clock}"] = round(statistics.median([f / s / denom for f, s in zip(hw_flops, secs)]), 4)
    return rec


def log_speedups(stage: str, results: dict, baseline: str) -> None:
    base = results.get(baseline)
    if base is None:
        return
    for variant, rec in results.items():
        if variant == baseline:
            continue
        ratios = {}
        for c in ("wall", "cpu"):
            if f"real_tokens_per_s_{c}" not in rec:
                continue
            ratios[f"speedup_{c}"] = round(rec[f"real_tokens_per_s_{c}"] / base[f"real_tokens_per_s_{c}"], 3)
            # Paired: the ratio within each interleaved round (same data, same moment), median over rounds.
            pairs = [a / b for a, b in zip(rec[f"real_tokens_per_s_{c}_reps"], base[f"real_tokens_per_s_{c}_reps"])]
            ratios[f"paired_speedup_{c}"] = round(statistics.median(pairs), 3)
        bl.log(stage=stage, summary=f"{variant} vs {baseline}", **ratios)


# ------------------------------------------------------------------ encode
def run_encode(name: str, spec: EncodeSpec, device, dtype, rate: dict) -> None:
    from denselm.inference import Encoder

    backbone = bl.build_backbone(spec.model, device, dtype).eval()
    shape = bl.model_shape(spec.model)
    docs = bl.corpus(7, spec.docs, spec.data)
    lengths = [len(d) for d in docs]
    encoders = {}

    def encoder(packing: bool) -> Encoder:
        if packing not in encoders:
            model = bl.denselm_model(backbone, packing=packing, packing_max_tokens=spec.packing_max_tokens).eval()
            encoders[packing] = Encoder(model, bl.id_tokenizer(), batch_size=spec.encoder_batch,
                                        max_tokens=spec.encoder_max_tokens)
        return encoders[packing]

    def run(variant: str):
        if variant.startswith("seed"):
            return bl.seed_encode(backbone, docs, spec.seed_batch, device, sort=variant == "seed-sorted")
        return encoder(variant == "denselm").encode_ids(docs)

    def executed(variant: str) -> list[int]:
        if variant.startswith("seed"):
            return bl.seed_encode_executed(docs, spec.seed_batch, sort=variant == "seed-sorted")
        if variant == "denselm":
            return lengths
        enc = encoder(False)
        return [max(lengths[i] for i in rows) for rows in enc.batches(lengths) for _ in rows]

    outputs, times = {}, {v: [] for v in spec.variants}
    for variant in spec.variants:  # warm-up (allocator, kernels) and the embeddings to compare
        outputs[variant] = torch.as_tensor(np.asarray(run(variant))).float().cpu()
    for _ in range(spec.reps):
        for variant in spec.variants:
            with bl.Clock(device) as clock:
                run(variant)
            times[variant].append((clock.wall, clock.cpu))
    results = {}
    ref = outputs[spec.variants[0]]
    for variant in spec.variants:
        exe = executed(variant)
        model_flops, hw_flops = bl.step_flops(lengths, exe, shape, train=False)
        rec = summarise(times[variant], [model_flops] * spec.reps, [hw_flops] * spec.reps, [sum(lengths)] * spec.reps, rate)
        cos = torch.nn.functional.cosine_similarity(outputs[variant], ref, dim=-1)
        rec.update(stage=name, variant=variant, model=spec.model, docs=spec.docs, real_tokens=sum(lengths),
                   padding_fraction=round(1 - sum(lengths) / sum(exe), 3), reps=spec.reps,
                   batch=spec.seed_batch if variant.startswith("seed") else
                   f"<= {spec.encoder_batch} rows, <= {spec.encoder_max_tokens} tokens",
                   min_cosine_vs_first=round(float(cos.min()), 5))
        results[variant] = rec
        bl.log(**rec)
    log_speedups(name, results, "seed-unsorted")


# ------------------------------------------------------------------ memory
def run_memory(spec: TrainSpec, args) -> None:
    """Peak memory of one training step, each variant in a fresh process (RSS never goes down)."""
    for variant in spec.variants:
        child = ["--child", variant, "--size", args.size, "--threads", str(args.threads),
                 "--seed-sub-batch", str(SEED_SUB_BATCH)]
        for rec in bl.run_child(os.path.abspath(__file__), child):
            bl.log(**rec)


def child_step(variant: str, spec: TrainSpec, device, dtype) -> None:
    trainer = Trainer(spec, device, dtype)
    q, p = bl.train_batch(100, spec.queries, spec.group, spec.data)
    with bl.PeakMemory(device) as mem:
        trainer.step(variant, q, p)
    bl.log(stage="memory", variant=variant, model=spec.model, batch=f"{spec.queries}x{spec.group}",
           real_tokens=sum(len(s) for s in q + p), **mem.record())


# -------------------------------------------------------------------- main
SEED_SUB_BATCH = -1


def main(argv=None) -> int:
    global SEED_SUB_BATCH
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("default", "tiny"), default="default")
    ap.add_argument("--stages", default=None, help=f"comma list; CPU {','.join(STAGES_CPU)}; GPU {','.join(STAGES_GPU)}")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: thread CPU time is exact)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per variant (overrides the stage's)")
    ap.add_argument("--seed-sub-batch", type=int, default=-1, help="the seed's sub_batch_size (-1: whole batch)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    SEED_SUB_BATCH = args.seed_sub_batch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = gpu_specs() if device.type == "cuda" else cpu_specs(args.size)
    if args.reps is not None:
        specs = {k: replace(v, reps=args.reps) for k, v in specs.items()}
    if args.child:
        child_step(args.child, specs["train"], device, dtype)
        return 0

    stages = args.stages.split(",") if args.stages else list(STAGES_GPU if device.type == "cuda" else STAGES_CPU)
    known = STAGES_GPU if device.type == "cuda" else STAGES_CPU
    unknown = [s for s in stages if s not in known]
    if unknown:
        ap.error(f"--stages: unknown {unknown} on {device.type}; choose from {', '.join(known)}")
    if device.type == "cuda":
        rate = bl.matmul_rate(device, dtype, 8192)
    else:
        rate = bl.matmul_rate(device, dtype, 256 if args.size == "tiny" else 1024)
    bl.log(stage="matmul", **rate, **bl.environment(device), formula=bl.FORMULA, size=args.size,
           seed_sub_batch=SEED_SUB_BATCH)
    for stage in stages:
        if stage == "matmul":
            continue
        if stage == "memory":
            run_memory(specs["train"], args)
        elif stage.endswith("encode"):
            run_encode(stage, specs[stage], device, dtype, rate)
        else:
            run_train(stage, specs[stage], device, dtype, rate)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
