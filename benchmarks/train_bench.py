"""Training speed on the real model: the seed's step against denselm's, side by side.

    python benchmarks/train_bench.py                      # SmolLM2-135M, both recipes, 3 alternating rounds
    python benchmarks/train_bench.py --recipes demo --reps 5
    python benchmarks/train_bench.py --recipes demo --layers 4 --variants seed,denselm,denselm-full-mlp
    python benchmarks/train_bench.py --quick              # tiny random model (CI smoke, seconds)

Model: the demo's converted SmolLM2-135M-Instruct folder (all 30 layers unless ``--layers``), or
``--model DIR``.  Texts: real training groups from ``data/pytrain/sections.jsonl.gz`` (query, its
positive, ``--group - 1`` negatives), tokenised once with denselm's tokeniser (BOS + text cut to
the max length - 1 + EOS); every variant trains on the same id lists, so tokenisation is not timed.

Recipes (LoRA on every linear layer, AdamW over the LoRA weights):
  fp32   float32 weights and LoRA (what the issue measured: 8 queries x 4 passages, LoRA r8)
  demo   the demo's shape: frozen bfloat16 weights, float32 LoRA (peft keeps adapters in fp32)

Variants:
  seed     the seed's step (``bench_lib.SeedStep``): each side left-padded to its batch maximum,
           hidden state at position -1, one forward per side, plain autograd
  denselm  ``BiEncoderModel`` as training builds it: right-padded collator batch, packed rows
           (padding-free, per-sequence attention), pooled-only last block
  denselm-full-mlp  the same with the last block's MLP at every token (``--variants``: what the
           pooled-only MLP saves in training; ``--layers 4`` is the shape of a demo step whose
           texts the frozen-layer cache already holds: only the 4 LoRA blocks run)
  denselm-padded  denselm without packing (what the demo's config trains with: padded batches,
           positions from zero)

Repetitions alternate the variants on the same batch (one round = each variant once), so load
from other processes hits both alike; ratios are taken within each round (paired) and reported
as median and range, with the loss of each variant (they must agree: same weights, same batch,
the optimizer step is skipped so every round starts from the same weights; in bf16 each is
also compared with the seed's loss on a float32 copy of the same weights, untimed).  One JSON line
per record; ``--markdown`` also prints the table rows on stderr.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"fp32": (torch.float32, "float32 weights, float32 LoRA"),
           "demo": (torch.bfloat16, "frozen bfloat16 weights, float32 LoRA")}


VARIANTS = ("seed", "denselm", "denselm-full-mlp", "denselm-padded")


def full_last_block():
    from denselm.model.speedups.pooled_only import full_last_block as switched_off

    return switched_off()


def load_groups(path: Path, n: int, group: int) -> list[tuple[str, list[str]]]:
    """The first ``n`` lines with at least ``group - 1`` negatives: (query, [positive, negatives...])."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if len(row.get("neg", [])) >= group - 1 and row.get("pos"):
                out.append((row["query"], [row["pos"][0], *row["neg"][: group - 1]]))
                if len(out) == n:
                    break
    if len(out) < n:
        raise SystemExit(f"{path}: only {len(out)} groups with {group - 1} negatives")
    return out


def real_batches(args, tokenizer) -> list[tuple[list[list[int]], list[list[int]]]]:
    from denselm.data.tokenize import tokenize_with_eos

    groups = load_groups(Path(args.data), args.queries * args.reps, args.group)
    batches = []
    for r in range(args.reps):
        part = groups[r * args.queries:(r + 1) * args.queries]
        q = tokenize_with_eos(tokenizer, [g[0] for g in part], args.query_max_len)
        p = tokenize_with_eos(tokenizer, [t for g in part for t in g[1]], args.passage_max_len)
        batches.append((q, p))
    return batches


def build(args, dtype: torch.dtype):
    """(backbone with LoRA, tokenizer or None)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    if args.quick:
        backbone = bl.build_backbone("tiny", torch.device("cpu"), dtype)
        tokenizer = None
    else:
        from denselm.demo import DEFAULT_MODEL_DIR, ensure_model

        folder = ensure_model(args.model or DEFAULT_MODEL_DIR)
        kw = {"num_hidden_layers": args.layers} if args.layers else {}
        backbone = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kw)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    backbone = get_peft_model(backbone, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                   target_modules="all-linear", lora_dropout=0.0))
    return backbone, tokenizer


def run_recipe(args, name: str) -> list[dict]:
    dtype, what = RECIPES[name]
    backbone, tokenizer = build(args, dtype)
    if args.quick:
        spec = bl.DataSpec(query_len=(4, 12), passage_median=24, passage_min=4, passage_cap=64, vocab=512)
        batches = [bl.train_batch(100 + r, args.queries, args.group, spec) for r in range(args.reps)]
    else:
        batches = real_batches(args, tokenizer)
    seed = bl.SeedStep(backbone, temperature=0.02)
    model = bl.denselm_model(backbone)
    padded = bl.denselm_model(backbone, packing=False, position_ids="from_zero")
    device = torch.device("cpu")
    # Below float32 the two layouts round differently, so neither loss is "the" answer: both are
    # also compared with the seed's loss on a float32 copy of the same (bf16-rounded) weights.
    reference = None
    if dtype != torch.float32:
        import copy

        reference = bl.SeedStep(copy.deepcopy(backbone).float(), temperature=0.02)

    def step(variant: str, q, p) -> float:
        if variant == "seed":
            loss = seed.loss(q, p, device)
        elif variant == "denselm-padded":
            loss = bl.denselm_loss(padded, q, p, device)
        elif variant == "denselm-full-mlp":
            with full_last_block():
                loss = bl.denselm_loss(model, q, p, device)
        else:
            loss = bl.denselm_loss(model, q, p, device)
        loss.backward()
        backbone.zero_grad(set_to_none=True)  # no optimizer step: every round starts from the same weights
        return float(loss)

    variants = tuple(args.variants.split(","))
    if variants[0] != "seed" or not set(variants) <= set(VARIANTS):
        raise SystemExit(f"--variants: seed first, then any of {VARIANTS[1:]}; got {args.variants}")
    for v in variants:  # warm-up (allocator, kernels)
        step(v, *batches[0])
    load_before = os.getloadavg()
    rates, losses = {v: [] for v in variants}, {v: [] for v in variants}
    real = [sum(len(s) for s in q + p) for q, p in batches]
    for r, (q, p) in enumerate(batches):
        for v in variants:
            t = time.perf_counter()
            losses[v].append(step(v, q, p))
            rates[v].append(real[r] / (time.perf_counter() - t))
    load_after = os.getloadavg()
    exact = []
    if reference is not None:
        with torch.no_grad():
            exact = [float(reference.loss(q, p, device)) for q, p in batches]
    padded = [max(map(len, q)) * len(q) + max(map(len, p)) * len(p) for q, p in batches]  # the seed's executed tokens
    records = []
    for v in variants:
        ratio = [a / b for a, b in zip(rates[v], rates["seed"])]
        rec = {"recipe": name, "dtype": what, "variant": v, "threads": torch.get_num_threads(),
               "model": "tiny random" if args.quick else f"SmolLM2-135M-Instruct ({backbone.config.num_hidden_layers} layers)",
               "batch": f"{args.queries}x{args.group}", "lora_rank": args.lora_rank,
               "real_tokens_per_step": round(statistics.mean(real)),
               "seed_padding": round(1 - statistics.mean(real) / statistics.mean(padded), 3),
               "tokens_per_s": round(statistics.median(rates[v]), 1),
               "tokens_per_s_range": [round(min(rates[v]), 1), round(max(rates[v]), 1)],
               "vs_seed_median": round(statistics.median(ratio), 3),
               "vs_seed_range": [round(min(ratio), 3), round(max(ratio), 3)],
               "max_loss_diff_vs_seed": round(max(abs(a - b) for a, b in zip(losses[v], losses["seed"])), 6),
               "max_loss_diff_vs_float32": (round(max(abs(a - b) for a, b in zip(losses[v], exact)), 6)
                                            if exact else 0.0),
               "reps": args.reps, "load_before": [round(x, 2) for x in load_before],
               "load_after": [round(x, 2) for x in load_after]}
        bl.log(**rec)
        records.append(rec)
    return records


def markdown(records: list[dict]) -> str:
    rows = ["| recipe | variant | real tok/s median (range) | vs seed (paired, range) | max loss diff vs seed "
            "| vs float32 | load avg |", "|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['dtype']} | {r['variant']} | {r['tokens_per_s']:,.0f} ({r['tokens_per_s_range'][0]:,.0f}-"
                    f"{r['tokens_per_s_range'][1]:,.0f}) | {r['vs_seed_median']:.2f}x ({r['vs_seed_range'][0]:.2f}-"
                    f"{r['vs_seed_range'][1]:.2f}) | {r['max_loss_diff_vs_seed']:.1e} | {r['max_loss_diff_vs_float32']:.1e} | "
                    f"{r['load_before'][0]} / {r['load_after'][0]} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a transformers folder (default: the demo's converted SmolLM2-135M)")
    ap.add_argument("--layers", type=int, default=None, help="first N layers (default: all)")
    ap.add_argument("--data", default=str(ROOT / "data" / "pytrain" / "sections.jsonl.gz"))
    ap.add_argument("--recipes", default="fp32,demo")
    ap.add_argument("--variants", default="seed,denselm", help=f"comma-separated, seed first: {', '.join(VARIANTS)}")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="passages per query (1 positive + negatives)")
    ap.add_argument("--query-max-len", type=int, default=64)
    ap.add_argument("--passage-max-len", type=int, default=256)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="tiny random model and random ids (CI smoke)")
    ap.add_argument("--markdown", action="store_true", help="also print the table rows on stderr")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        ap.error(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(args.threads)
    records = [rec for name in args.recipes.split(",") for rec in run_recipe(args, name)]
    if args.markdown:
        print(markdown(records), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
