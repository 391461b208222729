"""Training checkpoints: written atomically, loaded exactly, old ones pruned.

A checkpoint folder ``checkpoints/step-0000120/`` holds
  trainable.safetensors   every trainable parameter (full, gathered), by name
  optimizer.pt            AdamW state (tensors only; loaded with weights_only=True)
  trainer_state.json      step, batches consumed, scheduler, best metric, RNG states
  config.yaml             the resolved config
It is written to a temporary folder and renamed (``denselm.io.atomic_folder``): a crash
at any point, or a full disk, leaves the previous checkpoints intact and never a partial
one that looks complete.

``save_training_state`` / ``restore_training_state`` take the training's
``denselm.parallel`` strategy, which gathers the full tensors to rank 0 (and
shards them again on load): the files are the same for any world size and strategy.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, InputNotFound
from .io import atomic_folder, fault_point

if TYPE_CHECKING:
    from .model.encoder import BiEncoderModel
    from .parallel import Strategy

STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"


def rng_state() -> dict:
    """Every RNG the step touches, JSON-serialisable (torch states as byte lists)."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / COMPLETE_MARKER).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    protect: Path | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically, then delete all but the last ``keep_last`` (and ``protect``)."""
    final = Path(output_dir) / "checkpoints" / f"step-{step:07d}"
    with atomic_folder(final, point="checkpoint.commit") as tmp:  # fsync'ed, then renamed into place
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        fault_point("checkpoint")  # tests: a full disk or a kill between a checkpoint's files
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        state = {**trainer_state, "step": step, "rng": rng_state()}
        # Written last: its presence marks the folder complete.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(state))
    for old in list_checkpoints(output_dir)[:-keep_last]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable tensors, optimizer state, trainer state) of a complete checkpoint."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise InputNotFound(f"{path} is not a complete denselm checkpoint (no {COMPLETE_MARKER})")
    trainable = load_file(path / "trainable.safetensors")
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / COMPLETE_MARKER).read_text())
    return trainable, optimizer_state, trainer_state


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``--resume latest`` -> newest complete checkpoint (None when there is none); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).exists():
        raise InputNotFound(f"--resume {resume}: not a complete checkpoint folder")
    return path


def save_training_state(
    output_dir: str | Path,
    step: int,
    strategy: Strategy,
    model: BiEncoderModel,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    protect: Path | None = None,
) -> None:
    """Every rank: gather the full trainable weights and optimizer state; rank 0 writes ``step-N``."""
    tensors = strategy.trainable_state(model)
    if strategy.is_main:
        tensors = tensors | head_state(model)
    opt_state = strategy.optimizer_state(model, optimizer)
    # Each rank's dropout RNG differs (seeded seed + rank): keep all of them.
    rank_rng = strategy.all_gather_object(torch.get_rng_state().tolist())
    if strategy.is_main:
        save_checkpoint(output_dir, step, tensors, opt_state,
                        {**trainer_state, "world_size": strategy.world_size, "rank_rng": rank_rng},
                        config_yaml, keep_last, protect)
    strategy.barrier()


def restore_training_state(path: str | Path, strategy: Strategy, model: BiEncoderModel,
                           optimizer: torch.optim.Optimizer) -> dict:
    """Every rank: load a checkpoint's weights and optimizer state into the (wrapped) model; returns the trainer state."""
    tensors, opt_state, state = load_checkpoint(path)
    load_trainable(model, tensors, strategy, path)
    strategy.load_optimizer_state(model, optimizer, opt_state)
    return state


def load_trainable(model: BiEncoderModel, tensors: dict[str, torch.Tensor], strategy: Strategy | None = None,
                   path: str | Path = "checkpoint") -> None:
    """A checkpoint's ``trainable.safetensors`` tensors into the model: the distillation head,
    then the backbone's trainable parameters (sharded again by the strategy)."""
    if strategy is None:
        from .parallel import Single

        strategy = Single()
    tensors = dict(tensors)
    _load_head(model, {k[len(HEAD_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(HEAD_PREFIX)]},
               path)
    trainable = [n for n, p in strategy.unwrap(model.model).named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in tensors]
    if missing:
        raise ConfigError(f"--resume {path}: the checkpoint lacks trainable parameters, e.g. {missing[:3]} "
                          "(a different model.lora or model config?)")
    strategy.load_trainable(model, tensors)


HEAD_PREFIX = "denselm.embed_distill."
"""Checkpoint names of the distillation head (trained, resumed, never exported)."""


def head_state(model: BiEncoderModel) -> dict[str, torch.Tensor]:
    """The embedding-distillation head's parameters: outside the backbone (and its wrapper), the same on every rank."""
    if model.embed_distill is None:
        return {}
    return {HEAD_PREFIX + n: p.detach() for n, p in model.embed_distill.named_parameters()}


def _load_head(model: BiEncoderModel, head: dict[str, torch.Tensor], path) -> None:
    if model.embed_distill is None:
        return
    params = dict(model.embed_distill.named_parameters())
    if set(head) != set(params):
        raise ConfigError(f"--resume {path}: the checkpoint lacks the embedding-distillation head "
                          f"{sorted(set(params) - set(head))}")
    with torch.no_grad():
        for name, value in head.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
