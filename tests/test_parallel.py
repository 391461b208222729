"""denselm.parallel: wrapping, unwrapping, full state dicts, optimizer state and no-sync per strategy.

Single runs as it is; DDP and FSDP run in this process on a world-size-1 gloo group (the wrappers
are real, the collectives trivial), and on 2 processes in tests/dist_scripts/strategy_resume.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tiny_models import random_batch, tiny_backbone

from denselm import checkpoint as ckpt
from denselm import parallel
from denselm.distributed import DistInfo
from denselm.errors import ConfigError
from denselm.model.backbone import apply_lora
from denselm.model.encoder import BiEncoderModel

HERE = Path(__file__).parent
CPU = torch.device("cpu")


# ------------------------------------------------------------------ helpers (also used by the 2-process script)
def make_model(lora: bool, seed: int) -> BiEncoderModel:
    """A float64 tiny Llama bi-encoder; ``seed`` changes the trainable weights only (LoRA: the adapter)."""
    if lora:
        backbone = tiny_backbone("llama", dtype=torch.float64, seed=0)
        torch.manual_seed(seed)
        backbone = apply_lora(backbone, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        for p in backbone.parameters():
            if p.requires_grad:  # peft starts B at zero: make the adapter do something from step 1
                torch.nn.init.normal_(p, std=0.02)
    else:
        backbone = tiny_backbone("llama", dtype=torch.float64, seed=seed)
    return BiEncoderModel(model=backbone, tokenizer=None, normalized=True, temperature=0.05).train()


def micro_batch(rank: int, step: int) -> dict:
    """4 queries and 8 passages (group size 2), different per (rank, step)."""
    query, _ = random_batch(4, 3, 8, seed=1000 * step + 10 * rank)
    passage, _ = random_batch(8, 4, 10, seed=1000 * step + 10 * rank + 1)
    return {"query": query, "passage": passage}


def optimizer_for(model: BiEncoderModel) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_steps(strategy: parallel.Strategy, model, optimizer, steps) -> None:
    for step in steps:
        model(**micro_batch(strategy.rank, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resume_max_diff(strategy: parallel.Strategy, lora: bool, folder: Path) -> float:
    """Train 2 steps, checkpoint, train 2 more; a differently initialised model restored from the
    checkpoint trains the same 2 steps.  Returns the largest weight difference (rank 0; 0.0 elsewhere)."""
    a = strategy.wrap(make_model(lora, seed=0), CPU)
    opt_a = optimizer_for(a)
    train_steps(strategy, a, opt_a, [0, 1])
    ckpt.save_training_state(folder, 2, strategy, a, opt_a, {"note": "test"}, "{}\n", keep_last=1)
    train_steps(strategy, a, opt_a, [2, 3])
    ref = strategy.trainable_state(a)

    b = strategy.wrap(make_model(lora, seed=1), CPU)
    opt_b = optimizer_for(b)
    state = ckpt.restore_training_state(ckpt.list_checkpoints(folder)[-1], strategy, b, opt_b)
    assert state["step"] == 2 and state["note"] == "test" and state["world_size"] == strategy.world_size
    assert len(state["rank_rng"]) == strategy.world_size
    train_steps(strategy, b, opt_b, [2, 3])
    got = strategy.trainable_state(b)
    if not strategy.is_main:
        return 0.0
    assert set(got) == set(ref) and got
    return max(float((got[k] - ref[k]).abs().max()) for k in ref)


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def group(tmp_path):
    """A world-size-1 gloo process group, destroyed afterwards (other tests expect none)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=1)
    dist.destroy_process_group()


STRATEGIES = {"single": parallel.Single, "ddp": parallel.DDP, "fsdp": parallel.FSDP}


def strategy_of(name: str, request) -> parallel.Strategy:
    if name != "single":
        request.getfixturevalue("group")
    return STRATEGIES[name](DistInfo())


# ------------------------------------------------------------------ tests
def test_select_picks_single_at_world_size_one_and_the_named_strategy_above():
    assert type(parallel.select("ddp", DistInfo())) is parallel.Single
    assert type(parallel.select("fsdp", DistInfo())) is parallel.Single
    assert type(parallel.select("ddp", DistInfo(rank=1, world_size=2))) is parallel.DDP
    assert type(parallel.select("fsdp", DistInfo(rank=0, world_size=2))) is parallel.FSDP
    assert parallel.FSDP(DistInfo(0, 2)).supports_merge_lora is False
    assert parallel.DDP(DistInfo(0, 2)).supports_merge_lora is True
    with pytest.raises(ValueError, match="'zero3'"):
        parallel.select("zero3", DistInfo())


def test_setup_without_torchrun_is_single_and_owns_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    strategy = parallel.setup("fsdp")
    assert type(strategy) is parallel.Single and strategy.world_size == 1 and strategy.is_main
    assert not dist.is_initialized()
    assert strategy.broadcast_object({"a": 1}) == {"a": 1}
    assert strategy.all_gather_object(3) == [3]
    strategy.barrier()
    strategy.teardown()  # nothing to destroy
    assert not dist.is_initialized()


def test_teardown_destroys_only_a_group_setup_created(group):
    strategy = parallel.setup("ddp")  # the fixture's group exists: setup must not take it over
    strategy.teardown()
    assert dist.is_initialized()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["single", "ddp", "fsdp"])
def test_wrap_unwrap_round_trip_and_full_state_dict(name, lora, request):
    strategy = strategy_of(name, request)
    model = make_model(lora, seed=0)
    backbone = model.model
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    transformers_model = backbone.get_base_model() if lora else backbone

    assert strategy.wrap(model, CPU) is model
    if name == "ddp":
        assert isinstance(model.model, torch.nn.parallel.DistributedDataParallel)
    # Unwrapping gives back the very backbone we wrapped (peft kept), and under it the transformers model.
    assert strategy.unwrap(model.model) is backbone
    assert parallel.unwrap(model.model) is backbone
    assert parallel.base_model(model.model) is transformers_model
    assert hasattr(strategy.unwrap(model.model), "peft_config") == lora

    full = strategy.full_state_dict(model)
    assert set(full) == set(before)
    for key, value in before.items():
        assert torch.equal(full[key].cpu(), value), key
    trainable = strategy.trainable_state(model)
    expected = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert set(trainable) == expected and all(torch.equal(trainable[n].cpu(), before[n]) for n in expected)
    if lora:
        assert all("lora_" in n for n in expected)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["single", "ddp", "fsdp"])
def test_checkpoint_round_trip_resumes_exactly(name, lora, request, tmp_path):
    # The optimizer's moments and step count come back too: a fresh AdamW would step differently.
    assert resume_max_diff(strategy_of(name, request), lora, tmp_path / "run") == 0.0


def test_restoring_a_checkpoint_without_the_trainable_parameters_names_resume(tmp_path):
    strategy = parallel.Single()
    full = make_model(False, seed=0)
    ckpt.save_training_state(tmp_path, 1, strategy, full, optimizer_for(full), {}, "", keep_last=1)
    lora = make_model(True, seed=0)
    with pytest.raises(ConfigError, match=r"--resume .*step-0000001.*lacks trainable parameters.*lora_"):
        ckpt.restore_training_state(ckpt.list_checkpoints(tmp_path)[-1], strategy, lora, optimizer_for(lora))


@pytest.mark.parametrize("name", ["single", "ddp"])
def test_no_sync_accumulates_the_same_gradients_at_world_size_one(name, request):
    strategy = strategy_of(name, request)
    plain = make_model(False, seed=0)
    wrapped = strategy.wrap(make_model(False, seed=0), CPU)
    ctx = strategy.no_sync(wrapped)
    if name == "single":
        assert isinstance(ctx, contextlib.nullcontext)
    assert isinstance(strategy.no_sync(wrapped, enabled=False), contextlib.nullcontext)
    for step in (0, 1):  # accumulate two micro-batches, the first without sync
        with (ctx if step == 0 else strategy.no_sync(wrapped, enabled=False)):
            wrapped(**micro_batch(0, step)).loss.backward()
        plain(**micro_batch(0, step)).loss.backward()
    got = dict(strategy.unwrap(wrapped.model).named_parameters())
    for n, p in plain.model.named_parameters():
        assert torch.equal(got[n].grad, p.grad), n


@pytest.mark.timeout(400)
def test_two_processes_resume_exactly_and_ddp_no_sync_skips_the_all_reduce(tmp_path):
    from test_distributed import torchrun

    out = tmp_path / "result.json"
    torchrun(HERE / "dist_scripts" / "strategy_resume.py", str(out), str(tmp_path / "runs"))
    results = json.loads(out.read_text())
    assert {(r["strategy"], r["lora"]) for r in results} == {(s, l) for s in ("ddp", "fsdp") for l in (False, True)}
    for r in results:
        assert r["resume_max_diff"] == 0.0, r
        assert r["full_state_matches_rank_weights"], r
        if r["strategy"] == "ddp":
            assert r["grads_differ_under_no_sync"] and r["grads_equal_after_sync"], r


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
