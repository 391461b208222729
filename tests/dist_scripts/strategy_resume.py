"""Run under torchrun (2 processes, gloo): the DDP and FSDP strategies checkpoint and resume exactly.

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/strategy_resume.py OUT.json RUNS_DIR

For each strategy, with and without LoRA: a checkpoint written by rank 0 and loaded by every
rank (sharded again under FSDP) continues training bit for bit; the gathered full state dict
equals the weights every rank started from; DDP's no_sync leaves each rank its own gradients.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from equivalence import flat_grads  # noqa: E402
from test_parallel import CPU, make_model, micro_batch, resume_max_diff  # noqa: E402

from denselm import parallel  # noqa: E402


def ranks_grads(strategy: parallel.Strategy, model) -> list[torch.Tensor]:
    grads = flat_grads(strategy.unwrap(model.model))
    gathered = [torch.zeros_like(grads) for _ in range(strategy.world_size)]
    dist.all_gather(gathered, grads)
    return gathered


def main(out_path: str, runs: str) -> None:
    launched = parallel.setup("ddp", backend="gloo")  # owns the process group: tears it down at the end
    assert launched.world_size == 2, launched
    results = []
    for name in ("ddp", "fsdp"):
        strategy = parallel.select(name)
        for lora in (False, True):
            row = {"strategy": name, "lora": lora, "world_size": strategy.world_size}
            row["resume_max_diff"] = resume_max_diff(strategy, lora, Path(runs) / f"{name}-{lora}")

            start = {k: v.clone() for k, v in make_model(lora, seed=0).model.state_dict().items()}
            model = strategy.wrap(make_model(lora, seed=0), CPU)
            full = strategy.full_state_dict(model)
            if strategy.is_main:
                row["full_state_matches_rank_weights"] = set(full) == set(start) and all(
                    torch.equal(full[k].cpu(), v) for k, v in start.items())

            if name == "ddp":
                with strategy.no_sync(model):
                    model(**micro_batch(strategy.rank, 0)).loss.backward()
                local = ranks_grads(strategy, model)
                row["grads_differ_under_no_sync"] = not torch.equal(local[0], local[1])
                model.zero_grad(set_to_none=True)
                with strategy.no_sync(model, enabled=False):
                    model(**micro_batch(strategy.rank, 0)).loss.backward()
                synced = ranks_grads(strategy, model)
                row["grads_equal_after_sync"] = torch.equal(synced[0], synced[1])
            results.append(row)
    if launched.is_main:
        Path(out_path).write_text(json.dumps(results, indent=1))
    launched.barrier()
    launched.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
