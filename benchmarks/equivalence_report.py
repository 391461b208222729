"""Measure the equivalence errors the tests bound, for benchmarks/RESULTS.md.

    python benchmarks/equivalence_report.py            # JSON lines on stdout

Relative error by norm, ||a - b|| / ||b||, of loss and parameter gradients:
denselm vs the seed's maths (left padding), right vs left padding, gradient
caching vs a plain step, in float64 and float32, on tiny Llama and Qwen2 configs.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_encoder import make_inputs, run_ours, run_seed  # noqa: E402
from equivalence import rel_err  # noqa: E402
from tiny_models import tiny_backbone  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    worst: dict[str, float] = {}
    for dtype, arch, mode, teacher, normalized, sub in itertools.product(
        (torch.float64, torch.float32), ("llama", "qwen2"), ("normal", "custom"), (False, True), (True, False), (-1, 2)
    ):
        backbone = tiny_backbone(arch, dtype=dtype)
        q, p, t = make_inputs()
        t = t if teacher else None
        ref = run_seed(backbone, q, p, mode, t, normalized, 0.05, sub)
        ours = run_ours(backbone, q, p, mode, t, normalized, 0.05, sub)
        qr, pr, _ = make_inputs(padding_side="right")
        right = run_ours(backbone, qr, pr, mode, t, normalized, 0.05, sub)
        cached = run_ours(backbone, q, p, mode, t, normalized, 0.05, -1, grad_cache=True, grad_cache_chunk_size=2)
        name = str(dtype).split(".")[-1]
        rows = {
            f"{name}/seed_vs_denselm/loss": rel_err(ours[0], ref[0]),
            f"{name}/seed_vs_denselm/grad": rel_err(ours[2], ref[2]),
            f"{name}/right_vs_left_padding/loss": rel_err(right[0], ours[0]),
            f"{name}/right_vs_left_padding/grad": rel_err(right[2], ours[2]),
            f"{name}/grad_cache_vs_plain/loss": rel_err(cached[0], ours[0]),
            f"{name}/grad_cache_vs_plain/grad": rel_err(cached[2], ours[2]),
        }
        for k, v in rows.items():
            worst[k] = max(worst.get(k, 0.0), v)
    for k, v in sorted(worst.items()):
        print(json.dumps({"check": k, "max_rel_err": v, "combinations": 32}))


if __name__ == "__main__":
    main()
