"""Where encoding time goes: padded vs packed, torch.profiler op shares and CPU-time ratios.

    python benchmarks/profile_encode.py                                  # SmolLM2-shaped, 4 layers, random init
    python benchmarks/profile_encode.py --model DIR --dtype bfloat16     # a real folder (e.g. the demo's smollm2)
    python benchmarks/profile_encode.py --threads 2 --texts 64 --no-profile

Both ways encode the same unsorted batch (random token ids, lengths uniform in
[--min-len, --max-len], from_zero positions, last-token pooling, no_grad) with
one ``BiEncoderModel``: padded to the batch maximum, or packed
(``packing=True``).  Repetitions alternate padded/packed; each is timed by
wall clock and by process CPU time (``time.process_time``: on a shared machine
the wall clock also counts other processes' turns).  Median and range.

Then one profiled repetition of each: the top ops by self CPU time, and
``aten::cat`` split by caller (packed attention's one copy, inside its named
profiler range, vs the model's own ``rotate_half``).  The profiler times ops by wall clock: run it on an idle
machine, or with ``--threads 1``, or its shares mislead (measured: with 2
threads at load average 12, aten::cat showed 21% of packed encoding against
1.8% on one thread; many small multi-threaded ops wait at their barriers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from denselm import BiEncoderModel  # noqa: E402
from denselm.data.tokenize import pad_batch  # noqa: E402
from denselm.model.speedups import packing  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(args) -> torch.nn.Module:
    from transformers import AutoModel, LlamaConfig

    if args.model:
        return AutoModel.from_pretrained(args.model, dtype=DTYPES[args.dtype], attn_implementation="sdpa").eval()
    # SmolLM2-135M's shapes with fewer layers (throughput per layer does not depend on the weights).
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, pad_token_id=2)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, attn_implementation="sdpa").to(DTYPES[args.dtype]).eval()


def batch(args, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.texts,), generator=g).tolist()
    seqs = [torch.randint(3, vocab, (n - 1,), generator=g).tolist() + [2] for n in lengths]  # EOS id 2 last
    return pad_batch(seqs, pad_id=2, padding_side="left")


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s (range {min(values):.3f}-{max(values):.3f})"


def cat_callers(prof) -> dict[str, float]:
    """Self CPU seconds of aten::cat by caller: packed attention's (inside its named profiler
    range) and the model's own (rotate_half)."""
    averages = {e.key: e for e in prof.key_averages()}
    every = averages["aten::cat"].self_cpu_time_total / 1e6 if "aten::cat" in averages else 0.0
    ours = averages[packing.CAT_RANGE].cpu_time_total / 1e6 if packing.CAT_RANGE in averages else 0.0
    return {"packing": ours, "model": every - ours}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a transformers folder (default: random init, SmolLM2 shapes)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    backbone = load(args)
    feats = batch(args, backbone.config.vocab_size)
    ways = {
        "padded": BiEncoderModel(model=backbone, normalized=True, position_ids="from_zero"),
        "packed": BiEncoderModel(model=backbone, normalized=True, position_ids="from_zero", packing=True),
    }
    real, padded_tokens = int(feats["attention_mask"].sum()), feats["input_ids"].numel()
    print(f"model {args.model or f'random SmolLM2-shaped, {args.layers} layers'}, {args.dtype}, "
          f"{args.threads} thread(s), {args.texts} texts of {args.min_len}-{args.max_len} random tokens: "
          f"{real} real of {padded_tokens} padded tokens")
    with torch.no_grad():
        a, b = (ways[k].encode(feats) for k in ("padded", "packed"))  # also a warm-up
        print(f"cosine(padded, packed) min {torch.nn.functional.cosine_similarity(a, b).min().item():.6f}")
        times = {k: ([], []) for k in ways}
        for _ in range(args.reps):
            for name, model in ways.items():  # alternating
                wall, cpu = timed(lambda: model.encode(feats))
                times[name][0].append(wall)
                times[name][1].append(cpu)
        for name, (wall, cpu) in times.items():
            print(f"{name}: wall {summary(wall)}; cpu {summary(cpu)}")
        for i, clock in enumerate(("wall", "cpu")):
            ratio = statistics.median(times["padded"][i]) / statistics.median(times["packed"][i])
            print(f"packed speed-up over padded ({clock}, medians): {ratio:.2f}x")
        if args.no_profile:
            return
        from torch.profiler import ProfilerActivity, profile

        for name, model in ways.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.encode(feats)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
            print(f"\n{name}: {total:.3f} s self CPU in ops; top ops:")
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            for event in [e for e in ops if e.key.startswith("aten::")][:8]:
                print(f"  {event.key:55s} {event.self_cpu_time_total / 1e6:7.3f} s "
                      f"{100 * event.self_cpu_time_total / 1e6 / total:5.1f}%  x{event.count}")
            callers = cat_callers(prof)
            print("  aten::cat by caller: " + ", ".join(f"{k} {v:.3f} s ({100 * v / total:.1f}%)"
                                                       for k, v in callers.items()))


if __name__ == "__main__":
    main()
