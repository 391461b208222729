"""The model's forward with issue 13's loss options: gradient caching and packing change no number.

Float64, as the other equivalence tests (packing in float32 too, as tests/test_packing.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from denselm import BiEncoderModel, losses
from equivalence import flat_grads, rel_err, tol
from tiny_models import random_batch, tiny_backbone

B, G = 4, 3
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
OPTION_SETS = {
    "margin": losses.LossOptions(margin=0.0),
    "teacher_margin": losses.LossOptions(teacher_margin=0.3),
    "gte_joint": losses.LossOptions(directions=ALL),
    "symmetric_per_direction": losses.LossOptions(directions=("query_to_doc", "doc_to_query"),
                                                  partition_mode="per_direction"),
    "hardness": losses.LossOptions(hardness_mode="all_negatives", hardness_strength=5.0),
    "everything": losses.LossOptions(margin=0.0, teacher_margin=0.3, directions=ALL,
                                     hardness_mode="in_batch_negatives", hardness_strength=9.0),
}


def make_inputs(padding_side="left", seed=0):
    query, _ = random_batch(B, 3, 9, seed=seed, padding_side=padding_side)
    passage, _ = random_batch(B * G, 4, 14, seed=seed + 1, padding_side=padding_side)
    teacher = torch.randn(B * G, generator=torch.Generator().manual_seed(seed + 2))
    duplicate = torch.zeros(B, B * G, dtype=torch.bool)
    duplicate[1, 7] = True  # as the collator would mark a copy of query 1's positive
    return query, passage, teacher, duplicate


def step(backbone, query, passage, teacher, fn_mask, options, mode="normal", **kw):
    model = BiEncoderModel(model=backbone, tokenizer=None, normalized=True, temperature=0.05, loss_options=options, **kw)
    model.train()
    backbone.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage, messages=[mode], teacher_scores=teacher, false_negative_mask=fn_mask)
    out.loss.backward()
    return out, flat_grads(backbone)


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("chunking", [dict(grad_cache_chunk_size=3), dict(grad_cache_max_tokens=30)])
def test_grad_cache_equals_plain_step(name, chunking):
    backbone = tiny_backbone("llama", dtype=torch.float64)
    query, passage, teacher, dup = make_inputs()
    plain, plain_grads = step(copy.deepcopy(backbone), query, passage, teacher, dup, OPTION_SETS[name])
    cached, cached_grads = step(backbone, query, passage, teacher, dup, OPTION_SETS[name], grad_cache=True, **chunking)
    assert rel_err(cached.loss.detach(), plain.loss.detach()) <= 1e-10
    assert rel_err(cached_grads, plain_grads) <= 1e-10
    assert cached.metrics == pytest.approx(plain.metrics, rel=1e-10)
    # the options change the loss (they are not silently off)
    seed_like, _ = step(copy.deepcopy(backbone), query, passage, teacher, dup, None)
    assert abs(float(seed_like.loss.detach()) - float(plain.loss.detach())) > 1e-6


@pytest.mark.parametrize("name", ["margin", "teacher_margin", "everything"])
def test_masked_fractions_are_reported(name):
    backbone = tiny_backbone("qwen2", dtype=torch.float64)
    query, passage, teacher, dup = make_inputs(seed=4)
    out, _ = step(backbone, query, passage, teacher, dup, OPTION_SETS[name])
    m = out.metrics
    assert m["masked/false_negatives"] == pytest.approx(1 / (B * (B * G - 1)))
    key = "masked/margin" if name != "teacher_margin" else "masked/teacher_margin"
    assert 0 < m[key] < 1, m
    assert max(m["masked/false_negatives"], m[key]) <= m["masked/any"] <= m["masked/false_negatives"] + m.get(
        "masked/margin", 0) + m.get("masked/teacher_margin", 0) + 1e-12
    # the margin fraction by hand from the embeddings
    if name == "margin":
        raw = out.q_reps @ out.p_reps.T
        pos = raw[torch.arange(B), torch.arange(B) * G]
        hand = (raw > pos[:, None]).sum().item() / (B * (B * G - 1))
        assert m["masked/margin"] == pytest.approx(hand)


def test_custom_mode_margins_mask_own_group():
    backbone = tiny_backbone("llama", dtype=torch.float64)
    query, passage, teacher, _ = make_inputs(seed=5)
    teacher.view(B, G)[:, 0] += 1.0  # most negatives below the teacher's positive
    opts = losses.LossOptions(margin=0.02, teacher_margin=0.5)
    out, grads = step(copy.deepcopy(backbone), query, passage, teacher, None, opts, mode="custom")
    cached, cgrads = step(backbone, query, passage, teacher, None, opts, mode="custom", grad_cache=True,
                          grad_cache_chunk_size=2)
    local = losses.group_scores(out.q_reps, out.p_reps, G)  # (B, G) raw
    t = teacher.view(B, G)
    mask = (local > local[:, :1] + 0.02) | (t > t[:, :1] + 0.5)
    expected = losses.local_contrastive_loss(local / 0.05, mask)
    assert rel_err(out.loss.detach(), expected) <= 1e-12
    assert rel_err(cgrads, grads) <= 1e-10
    assert out.metrics["masked/any"] == pytest.approx(mask[:, 1:].float().mean().item())
    assert 0 < out.metrics["masked/any"] < 1, out.metrics


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_step_equals_padded(name, padding_side):
    backbone = tiny_backbone("qwen2", dtype=torch.float32)
    query, passage, teacher, dup = make_inputs(padding_side, seed=2)
    ref, ref_grads = step(copy.deepcopy(backbone), query, passage, teacher, dup, OPTION_SETS[name],
                          position_ids="from_zero")
    ours, grads = step(backbone, query, passage, teacher, dup, OPTION_SETS[name], packing=True, packing_max_tokens=30,
                       grad_cache=True, grad_cache_chunk_size=5)
    assert rel_err(ours.loss.detach(), ref.loss.detach()) <= tol(torch.float32)
    assert rel_err(grads, ref_grads) <= tol(torch.float32)
    assert ours.metrics == pytest.approx(ref.metrics)


def test_default_options_take_the_seed_path():
    backbone = tiny_backbone("llama", dtype=torch.float64)
    query, passage, teacher, dup = make_inputs()
    a, ga = step(copy.deepcopy(backbone), query, passage, teacher, dup, None)
    b, gb = step(backbone, query, passage, teacher, dup, losses.LossOptions())
    assert float(a.loss) == float(b.loss) and torch.equal(ga, gb)
    assert not any(k.startswith("masked/") for k in b.metrics)


def test_train_logs_masked_fractions(tmp_path):
    """`denselm train` with the margin and same-document masks: each step logs what each mask removed."""
    from test_train import read_log, write_config

    from denselm.cli import main as cli_main
    from tiny_models import make_model_dir

    cfg = write_config(tmp_path, make_model_dir(tmp_path / "tiny"), loss={"margin": 0.0},
                       data={"mask_same_document": True}, train={"max_steps": 2, "save_every": 2})
    assert cli_main(["train", str(cfg)]) == 0
    log = read_log(tmp_path / "out")
    for step in (1, 2):
        r = log[step]
        assert 0 <= r["masked/false_negatives"] <= r["masked/any"] <= 1
        assert 0 < r["masked/margin"] <= r["masked/any"], r
        assert "same_document_masked" in r
