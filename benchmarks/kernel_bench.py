"""The kernels under SmolLM2-135M encoding on this CPU: matmul throughput and one sequence's attention.

    python benchmarks/kernel_bench.py            # 2 threads, bf16 and fp32

Rows: ``F.linear`` GFLOP/s for the (2048-token) shapes of one SmolLM2 layer, and causal GQA
attention of one sequence (9 query / 3 kv heads of 64) through SDPA's CPU kernel against the
same attention written as two grouped matmuls (transformers' eager numerics), in microseconds.
benchmarks/RESULTS.md ("2026-12-07") compares the model's matmul rate in a packed encode with
these, and records why the matmul attention was not kept.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (2048, 576, 192)]  # (tokens, in, out)


def per_call(fn, n: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def grouped_matmul_attention(q, k, v):
    """q (H, L, d), k/v (Hkv, L, d) -> (H, L, d); query heads stacked per kv head."""
    heads, length, dim = q.shape
    kv = k.shape[0]
    scores = torch.matmul(q.reshape(kv, heads // kv * length, dim), k.transpose(1, 2)) * dim ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool).triu_(1)
    scores = scores.view(kv, heads // kv, length, length).masked_fill_(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(kv, -1, length)
    return torch.matmul(probs, v).view(heads, length, dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for dtype in (torch.bfloat16, torch.float32):
        for tokens, k, n in SHAPES:
            x, w = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            seconds = per_call(lambda: F.linear(x, w), 20)
            print(f"{str(dtype)[6:]:8s} linear ({tokens} x {k}) x ({k} x {n}): {2 * tokens * k * n / seconds / 1e9:6.0f} GFLOP/s")
        for length in (64, 200, 256):
            q = torch.randn(9, length, 64, dtype=dtype)
            kv = torch.randn(3, length, 64, dtype=dtype), torch.randn(3, length, 64, dtype=dtype)
            sdpa = per_call(lambda: F.scaled_dot_product_attention(q[None], kv[0][None], kv[1][None], is_causal=True,
                                                                   enable_gqa=True), 200)
            grouped = per_call(lambda: grouped_matmul_attention(q, *kv), 200)
            print(f"{str(dtype)[6:]:8s} attention, {length} tokens: SDPA {sdpa * 1e6:6.0f} us, grouped matmuls {grouped * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
