"""How training runs on 1 or N processes: the one owner of wrapping, unwrapping and full state dicts.

    strategy = parallel.setup(cfg.train.strategy)    # torchrun sets WORLD_SIZE; 1 process -> Single
    model = strategy.wrap(model, device)             # DDP around the backbone, or FSDP2 per layer
    with strategy.no_sync(model, enabled=not last_micro_batch):
        loss.backward()                              # accumulate without an all-reduce
    strategy.full_state_dict(model)                  # gathered weights, for saving on rank 0
    strategy.teardown()

A strategy is chosen once, from ``train.strategy`` and the world size (like litgpt's Fabric
strategies); the training loop calls its methods and never asks which one it has.

  Single   world size 1 (CPU or one GPU): wrapping is a no-op, state dicts are the module's own.
  DDP      the backbone inside ``DistributedDataParallel`` (outside it stays the BiEncoderModel,
           so gradient caching can call the wrapper's ``no_sync`` per chunk); every rank holds
           the full weights.
  FSDP     FSDP2 ``fully_shard`` on every decoder layer and the backbone: parameters are DTensor
           shards; full state dicts are gathered (to rank 0, on CPU) by every rank together.

Collective methods (``full_state_dict``, ``trainable_state``, ``optimizer_state``, ``barrier``,
``all_gather_object``, ``broadcast_object``) must be called by every rank.  Tensor collectives
used inside the loss (gather with gradients, the mean of the logged loss) are in
``denselm.distributed``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import distributed
from .distributed import DistInfo

if TYPE_CHECKING:
    from .model.encoder import BiEncoderModel

STRATEGIES = ("ddp", "fsdp")


# ------------------------------------------------------------------ unwrapping
def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers; a peft model stays a peft model.

    An FSDP2 module is not a wrapper (``fully_shard`` changes the module's class in
    place), so it is returned as it is.
    """
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def base_model(module: nn.Module) -> nn.Module:
    """The transformers model under every wrapper: DDP, torch.compile, then peft's LoRA."""
    module = unwrap(module)
    if hasattr(module, "get_base_model"):
        return module.get_base_model()
    return module


# ------------------------------------------------------------------ strategies
class Strategy:
    """The base: every method does what one process with a plain module does; DDP and FSDP override."""

    name = "single"
    supports_merge_lora = True
    """Whether rank 0 can merge LoRA into the base weights itself (it needs them unsharded)."""

    def __init__(self, info: DistInfo | None = None, owns_group: bool = False):
        self.info = info if info is not None else distributed.info()
        self._owns_group = owns_group

    # ---- who am I
    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def local_rank(self) -> int:
        return self.info.local_rank

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    # ---- wrapping
    def wrap(self, model: BiEncoderModel, device: torch.device) -> BiEncoderModel:
        """Wrap ``model.model`` (the backbone) in place for this strategy; returns ``model``."""
        return model

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The module without the wrapper ``wrap`` put around it (peft kept)."""
        return unwrap(module)

    def no_sync(self, model: BiEncoderModel, enabled: bool = True) -> contextlib.AbstractContextManager:
        """While active (and ``enabled``), backward accumulates gradients locally without syncing ranks.

        Gradient accumulation enters it for every micro-batch but the last.  A no-op here.
        """
        return contextlib.nullcontext()

    # ---- state dicts (collective: every rank calls them)
    def full_state_dict(self, model: BiEncoderModel) -> dict[str, torch.Tensor]:
        """Every weight of the unwrapped backbone, full size, by its ``state_dict`` name.

        Rank 0 gets the tensors; other ranks may get ``{}`` (only rank 0 writes files).
        """
        return self.unwrap(model.model).state_dict()

    def trainable_state(self, model: BiEncoderModel) -> dict[str, torch.Tensor]:
        """The trainable parameters, full size and detached, by name (``{}`` on ranks that do not write)."""
        inner = self.unwrap(model.model)
        return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}

    def load_trainable(self, model: BiEncoderModel, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full-size tensors (every rank holds all of them) into the trainable parameters."""
        params = dict(self.unwrap(model.model).named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def optimizer_state(self, model: BiEncoderModel, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's full state (``{}`` or a partial one on ranks that do not write)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model: BiEncoderModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state written by ``optimizer_state`` (every rank holds all of it)."""
        optimizer.load_state_dict(state)

    # ---- collectives on Python objects (no-ops at world size 1)
    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (what one rank decided, the others follow)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    # ---- process group
    def teardown(self) -> None:
        """Destroy the process group if ``setup`` created it (a group made by the caller stays)."""
        if self._owns_group and distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


class Single(Strategy):
    """One process (CPU or one GPU): nothing to wrap, sync or gather."""


class DDP(Strategy):
    """Data parallel: the backbone in ``DistributedDataParallel``; every rank holds full weights."""

    name = "ddp"

    def wrap(self, model: BiEncoderModel, device: torch.device) -> BiEncoderModel:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # Buffers (rotary tables) are computed identically on every rank: nothing to broadcast.
        model.model = DistributedDataParallel(model.model, device_ids=ids, broadcast_buffers=False)
        return model

    def no_sync(self, model: BiEncoderModel, enabled: bool = True) -> contextlib.AbstractContextManager:
        return model.model.no_sync() if enabled else contextlib.nullcontext()

    # State dicts: every rank holds the same full weights, so the module's own are the full ones.


class FSDP(Strategy):
    """Fully sharded (FSDP2): each decoder layer and the backbone sharded across ranks.

    Accumulation syncs every micro-batch (``no_sync`` is a no-op): the sums are the same.
    """

    name = "fsdp"
    # Merging LoRA needs the unsharded base on one rank; `denselm export` does it after training.
    supports_merge_lora = False

    def wrap(self, model: BiEncoderModel, device: torch.device) -> BiEncoderModel:
        from torch.distributed.fsdp import fully_shard

        from .model.backbone import decoder_layers

        for layer in decoder_layers(model.model):
            fully_shard(layer)
        fully_shard(model.model)
        return model

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def full_state_dict(self, model: BiEncoderModel) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # cpu_offload: only rank 0 receives the gathered tensors (the others get {}).
        return get_model_state_dict(self.unwrap(model.model), options=self._options(cpu_offload=True))

    def trainable_state(self, model: BiEncoderModel) -> dict[str, torch.Tensor]:
        inner = self.unwrap(model.model)
        names = [n for n, p in inner.named_parameters() if p.requires_grad]
        full = self.full_state_dict(model)
        return {n: full[n] for n in names} if self.is_main else {}

    def load_trainable(self, model: BiEncoderModel, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # Each rank keeps its shard of the full tensors; frozen weights are not in `tensors`.
        set_model_state_dict(self.unwrap(model.model), tensors, options=self._options(strict=False))

    def optimizer_state(self, model: BiEncoderModel, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model.model, optimizer, options=self._options(cpu_offload=True))

    def load_optimizer_state(self, model: BiEncoderModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        # Every rank read the whole file: no broadcast from rank 0 needed.
        set_optimizer_state_dict(model.model, optimizer, state,
                                 options=self._options(broadcast_from_rank0=False))


def select(name: str, info: DistInfo | None = None, owns_group: bool = False) -> Strategy:
    """The strategy for ``train.strategy`` ``name`` ("ddp" or "fsdp") at this world size.

    One process is always ``Single``: there is nothing to wrap or gather.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    info = info if info is not None else distributed.info()
    if info.world_size == 1:
        return Single(info, owns_group)
    return {"ddp": DDP, "fsdp": FSDP}[name](info, owns_group)


def setup(name: str = "ddp", backend: str | None = None) -> Strategy:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1) and pick the strategy.

    ``teardown()`` on the result destroys the group again if this call created it.
    """
    existed = distributed.is_initialized()
    info = distributed.init_from_env(backend)
    return select(name, info, owns_group=not existed and distributed.is_initialized())
