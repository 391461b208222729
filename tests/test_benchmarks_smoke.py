"""The speed and memory benchmarks run end to end at a tiny size and print well-formed results.

They are run by hand for real numbers (benchmarks/RESULTS.md); here only the
plumbing is checked, plus the facts that do not depend on timing: packed
variants have no padding, every encoder agrees with the seed's embeddings, and
gradient caching needs less memory than a plain step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark smoke runs (minutes on 2 cores)

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 240) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    assert lines
    return lines


@pytest.mark.timeout(300)
def test_speed_bench_tiny():
    lines = run_script("speed_bench.py", "--size", "tiny")
    head = lines[0]
    assert head["stage"] == "matmul" and head["flops_per_s_wall"] > 0 and head["dtype"] == "float32"
    assert "4N" in head["formula"] and "2N" in head["formula"]
    by = {(r["stage"], r["variant"]): r for r in lines if "variant" in r}
    for variant in ("seed", "denselm", "denselm-gc"):
        rec = by[("train", variant)]
        assert rec["real_tokens_per_s_wall"] > 0 and 0 < rec["mfu_wall"] <= rec["hfu_wall"]
        assert (rec["padding_fraction"] == 0.0) == (variant != "seed")
        assert by[("memory", variant)]["peak_mb"] >= by[("memory", variant)]["before_step_mb"] > 0
    for variant in ("seed-unsorted", "seed-sorted", "denselm-padded", "denselm"):
        rec = by[("encode", variant)]
        assert rec["min_cosine_vs_first"] >= 0.9999, variant  # same embeddings whatever the batching
    assert by[("encode", "denselm")]["padding_fraction"] == 0.0
    assert by[("encode", "seed-unsorted")]["padding_fraction"] > by[("encode", "seed-sorted")]["padding_fraction"]
    summaries = [r for r in lines if "summary" in r]
    assert {"denselm vs seed", "denselm vs seed-unsorted"} <= {r["summary"] for r in summaries}


@pytest.mark.timeout(300)
def test_memory_bench_tiny():
    lines = run_script("memory_bench.py", "--size", "tiny")
    by = {(r["variant"], r["queries"]): r for r in lines if "variant" in r}
    assert set(by) == {("plain", 8), ("sub_batch", 8), ("grad_cache", 8), ("grad_cache", 16)}
    # Same batch, same loss whatever the memory strategy.
    assert by[("plain", 8)]["loss"] == pytest.approx(by[("grad_cache", 8)]["loss"], rel=1e-5)
    assert by[("grad_cache", 8)]["step_mb"] < by[("plain", 8)]["step_mb"]
    summary = lines[-1]
    assert summary["summary"] == "grad cache vs plain" and summary["step_ratio"] < 1


@pytest.mark.timeout(300)
def test_encode_bench_quick():
    lines = run_script("encode_bench.py", "--quick")
    setup = lines[0]
    assert setup["stage"] == "setup" and setup["real_tokens"] > 0
    by = {(r["dtype"], r["variant"]): r for r in lines if r.get("stage") == "encode"}
    variants = ("seed-unsorted", "seed-sorted", "denselm", "denselm-padded", "denselm-packed")
    assert set(by) == {(d, v) for d in ("bfloat16", "float32") for v in variants}
    for (dtype, variant), rec in by.items():
        # Every row names what it measured, and every encoder gives the seed's embeddings.
        assert rec["threads"] == 2 and rec["model"] and rec["texts"] and len(rec["load_avg_before"]) == 3
        assert rec["tokens_per_s"]["min"] <= rec["tokens_per_s"]["median"] <= rec["tokens_per_s"]["max"]
        assert rec["min_cosine_vs_first"] >= (0.9999 if dtype == "float32" else 0.998), (dtype, variant)
        if variant != "seed-unsorted":
            assert rec["vs_seed-unsorted"]["median"] > 0
    assert set(by[("float32", "denselm")]["defaults"]) == {"packing", "packing_max_tokens", "batch_size", "max_tokens"}


@pytest.mark.timeout(300)
def test_train_bench_quick():
    variants = ("seed", "denselm", "denselm-full-mlp", "denselm-padded")
    lines = run_script("train_bench.py", "--quick", "--reps", "2", "--variants", ",".join(variants))
    by = {(r["recipe"], r["variant"]): r for r in lines}
    assert set(by) == {(r, v) for r in ("fp32", "demo") for v in variants}
    # bf16 losses are also compared with a float32 copy of the same weights
    assert all(by[("demo", v)]["max_loss_diff_vs_float32"] <= 5e-2 for v in variants)
    # the pooled-only last MLP changes no loss (same batch, same weights)
    assert abs(by[("fp32", "denselm")]["max_loss_diff_vs_seed"] - by[("fp32", "denselm-full-mlp")]["max_loss_diff_vs_seed"]) <= 1e-5
    for (recipe, variant), rec in by.items():
        assert rec["threads"] == 2 and rec["model"] == "tiny random" and rec["real_tokens_per_step"] > 0
        lo, hi = rec["tokens_per_s_range"]
        assert lo <= rec["tokens_per_s"] <= hi and rec["vs_seed_range"][0] <= rec["vs_seed_median"]
        # same weights, same batch: denselm's loss is the seed's (bf16 weights round differently per layout)
        assert rec["max_loss_diff_vs_seed"] <= (1e-4 if recipe == "fp32" else 5e-2), (recipe, variant)
    assert by[("fp32", "seed")]["vs_seed_median"] == 1.0


@pytest.mark.timeout(300)
def test_dtype_quality_tiny(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_api import save_tiny
    from test_train import _fruit_beir

    model = save_tiny(tmp_path / "model")
    lines = run_script("dtype_quality.py", "--model", str(model), "--data", str(_fruit_beir(tmp_path / "beir")))
    by = {r.get("dtype", "compare"): r for r in lines}
    assert set(by) == {"float32", "bfloat16", "compare"}
    assert (by["float32"]["weights"], by["bfloat16"]["weights"]) == ("float32", "bfloat16")
    for r in (by["float32"], by["bfloat16"]):
        assert 0 <= r["ndcg@10"] <= 1 and 0 <= r["mrr@10"] <= 1 and r["seconds"] >= 0
    cmp = by["compare"]
    assert cmp["compare"] == "bfloat16 vs float32" and cmp["ndcg@10_diff"] == round(
        by["bfloat16"]["ndcg@10"] - by["float32"]["ndcg@10"], 4)
    assert 0.9 < cmp["min_cosine_queries"] <= 1.00001 and 0.9 < cmp["min_cosine_passages"] <= 1.00001


@pytest.mark.timeout(900)
def test_serve_bench_tiny(tmp_path):
    """`denselm serve` and the plain sentence-transformers server against one tiny export, both lengths.

    infinity-emb runs too when its benchmark venv exists (it is never built here)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    pytest.importorskip("sentence_transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    engines = "denselm,st" + (",infinity" if serve_bench.infinity_available() else "")
    lines = run_script("serve_bench.py", "--tiny", "--quick", "--clients", "1,4", "--engines", engines,
                       "--work", str(tmp_path), "--table", str(tmp_path / "table.md"), timeout=850)
    config = lines[0]["config"]
    assert config["threads"] == 2 and config["dtype"] == "float32"
    assert config["mean_tokens"]["long"] >= 256 > config["mean_tokens"]["short"]
    # every engine computes the offline vectors (the same export, documents)
    checks = {r["engine"]: r for r in lines if "min_cosine_vs_offline" in r}
    assert set(checks) == set(engines.split(","))
    assert all(r["min_cosine_vs_offline"] >= 0.9999 for r in checks.values()), checks
    assert not [r for r in lines if "error" in r]
    cells = {(r["engine"], r["length"], r["clients"]): r for r in lines if "cell" in r}
    assert set(cells) == {(e, n, c) for e in checks for n in ("short", "long") for c in (1, 4)}
    for r in cells.values():
        assert r["requests"] == 8 and r["tokens_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        if r["clients"] == 4:
            assert r["vs_offline"] > 0
    offline = {r["offline"]: r for r in lines if "offline" in r}
    assert set(offline) == {"short@4", "long@4"}
    summary = lines[-1]["summary"]
    assert len(summary["loadavg_start"]) == 3 and "denselm_long_vs_offline" in summary
    assert "| long | 4 |" in (tmp_path / "table.md").read_text()
