"""denselm.checkpoint: atomic checkpoints, exact RNG round trip, pruning, resume resolution, a full disk."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from denselm import checkpoint as ckpt
from denselm.errors import EnvironmentProblem, InputNotFound
from denselm.io import TMP_PREFIX, faults


def save(root, step, keep_last=2, protect=None, value=1.0):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((2, 3), value)}, {"state": {}, "param_groups": []},
                                {"scheduler": {"last_epoch": step}}, "train:\n  lr: 0.1\n", keep_last, protect)


def test_round_trip_and_files(tmp_path):
    path = save(tmp_path, 3, value=2.5)
    assert path == tmp_path / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "optimizer.pt", "trainable.safetensors",
                                                      "trainer_state.json"]
    tensors, opt, state = ckpt.load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.full((2, 3), 2.5)) and opt == {"state": {}, "param_groups": []}
    assert state["step"] == 3 and state["scheduler"] == {"last_epoch": 3}


def test_rng_state_round_trip_is_exact():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_keep_last_prunes_but_protects_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2, protect=tmp_path / "checkpoints" / "step-0000001")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000001", "step-0000003", "step-0000004"]


def test_incomplete_and_temp_folders_are_never_listed(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "checkpoints" / "step-0000002").mkdir()  # no trainer_state.json: not complete
    (tmp_path / "checkpoints" / f"{TMP_PREFIX}1-step-0000003-x").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000001"]
    assert ckpt.resolve_resume(tmp_path, "latest").name == "step-0000001"
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None
    assert ckpt.resolve_resume(tmp_path, None) is None
    with pytest.raises(InputNotFound, match="not a complete checkpoint folder"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-0000002"))
    with pytest.raises(FileNotFoundError, match="not a complete denselm checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-0000002")


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    save(tmp_path, 2, value=1.0)
    save(tmp_path, 2, value=7.0)
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-0000002")[0]["w"], torch.full((2, 3), 7.0))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]


@pytest.mark.parametrize("spec", ["checkpoint:enospc", "checkpoint.commit:enospc", "checkpoint:eio"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, spec):
    first = save(tmp_path, 1)
    with faults(spec), pytest.raises(EnvironmentProblem, match="step-0000002"):
        save(tmp_path, 2)
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]


def test_torch_disk_full_runtime_error_becomes_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(EnvironmentProblem, match="disk full writing .*step-0000001: free space"):
        save(tmp_path, 1)
    assert ckpt.list_checkpoints(tmp_path) == [] and list((tmp_path / "checkpoints").iterdir()) == []
