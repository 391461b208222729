"""Cross-device negatives on 2 CPU processes (gloo) equal one process holding the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.timeout(400)
def test_cross_device_gradients_equal_single_process(tmp_path):
    out = tmp_path / "result.json"
    torchrun(HERE / "dist_scripts" / "cross_device.py", str(out))
    results = json.loads(out.read_text())
    assert len(results) == 8
    for r in results:
        assert r["grad_rel_err_vs_single_process"] <= 1e-10, r
        assert r["ranks_agree_rel_err"] <= 1e-12, r
        assert r["loss_rel_err"] <= 1e-10, r
        if r.get("padding", "left") == "left":
            assert r["grad_rel_err_vs_seed_single_process"] <= 1e-10, r


@pytest.mark.timeout(400)
def test_cross_device_loss_options_equal_single_process(tmp_path):
    """Margin masks, extra InfoNCE terms, hardness weighting, embedding distillation (MSE and listwise KL
similarity terms): 2 processes equal 1 (issues 13, 14)."""
    out = tmp_path / "result.json"
    torchrun(HERE / "dist_scripts" / "cross_device_options.py", str(out))
    results = json.loads(out.read_text())
    assert len(results) == 12
    for r in results:
        assert r["grad_rel_err_vs_single_process"] <= 1e-10, r
        assert r["ranks_agree_rel_err"] <= 1e-12, r
        assert r["loss_rel_err"] <= 1e-10, r
        assert r["masked_fraction_abs_err"] <= 1e-12, r
    assert any(r["masked"].get("masked/margin", 0) > 0 for r in results)
