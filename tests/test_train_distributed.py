"""`torchrun --nproc_per_node 2 denselm train` (gloo, CPU) equals one process holding the global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train import _max_rel, write_config
from tiny_models import make_model_dir

from denselm.cli import main as cli_main


def _torchrun_train(cfg, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "denselm.cli", "train", str(cfg), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def model_dir64(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny64d") / "qwen", arch="qwen2", dtype=torch.float64)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, model_dir64, strategy, record_property):
    # from_zero positions: each rank pads its own slice to its own length, and the seed's
    # end-aligned positions would move by that padding (RoPE tables in float32: ~1e-9 here).
    model = {"name_or_path": str(model_dir64), "dtype": "float64", "position_ids": "from_zero",
             "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    train = {"max_steps": 2, "save_every": 2, "tensorboard": False, "max_grad_norm": None}
    single = write_config(tmp_path / "one", model_dir64, model=model,
                          train={**train, "per_device_batch_size": 4, "output_dir": str(tmp_path / "one" / "out")})
    assert cli_main(["train", str(single)]) == 0
    double = write_config(tmp_path / "two", model_dir64, model=model,
                          train={**train, "per_device_batch_size": 2, "strategy": strategy,
                                 "output_dir": str(tmp_path / "two" / "out")})
    _torchrun_train(double)
    one = load_file(tmp_path / "one" / "out" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    two = load_file(tmp_path / "two" / "out" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    assert set(one) == set(two)
    # The 2-rank update (cross-device negatives, DDP or FSDP2) equals one process with the whole batch.
    record_property(f"{strategy}_vs_single_rel_err", _max_rel(two, one))
    assert _max_rel(two, one) <= 1e-10
    # The saved final model is rank 0's weights, in full (FSDP gathers them).
    saved = load_file(tmp_path / "two" / "out" / "model" / "adapter_model.safetensors")
    assert len(saved) == len([k for k in two if "lora" in k])
    for key, value in saved.items():
        match = [k for k in two if k.replace(".default", "") == key]
        assert match and torch.equal(value, two[match[0]]), key
    # Logged losses are the global ones: the same as the single process's.
    import json

    log1 = [json.loads(l)["loss"] for l in (tmp_path / "one" / "out" / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(l)["loss"] for l in (tmp_path / "two" / "out" / "log.jsonl").read_text().splitlines()]
    assert max(abs(a - b) for a, b in zip(log1, log2)) <= 1e-9
