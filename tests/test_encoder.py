"""BiEncoderModel against the seed's maths: loss and gradients, both padding sides, every mode."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch

from denselm import BiEncoderModel
from equivalence import flat_grads, rel_err, tol
from seed_reference import SeedBiEncoder
from tiny_models import random_batch, tiny_backbone

B, G = 3, 4


def make_inputs(padding_side="left", seed=0, q_len=(4, 9), p_len=(5, 14)):
    query, _ = random_batch(B, *q_len, seed=seed, padding_side=padding_side)
    passage, _ = random_batch(B * G, *p_len, seed=seed + 1, padding_side=padding_side)
    teacher = torch.randn(B * G, generator=torch.Generator().manual_seed(seed + 2)).tolist()
    return query, passage, teacher


def run_seed(backbone, query, passage, mode, teacher, normalized, temperature, sub_batch):
    seed = SeedBiEncoder(backbone, normlized=normalized, temperature=temperature, sub_batch_size=sub_batch)
    backbone.zero_grad(set_to_none=True)
    loss, scores, q, p = seed(query, passage, [mode], teacher)
    loss.backward()
    return loss.detach(), scores.detach(), flat_grads(backbone)


def run_ours(backbone, query, passage, mode, teacher, normalized, temperature, sub_batch, **kw):
    model = BiEncoderModel(
        model=backbone, tokenizer=None, normalized=normalized, temperature=temperature, sub_batch_size=sub_batch, **kw
    )
    model.train()
    backbone.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage, messages=[mode], teacher_scores=teacher)
    out.loss.backward()
    return out.loss.detach(), out.scores.detach(), flat_grads(backbone)


COMBOS = list(itertools.product(["normal", "custom"], [False, True], [True, False], [-1, 2]))


@pytest.mark.parametrize("mode,with_teacher,normalized,sub_batch", COMBOS)
def test_matches_seed_float64(float64_backbone, mode, with_teacher, normalized, sub_batch):
    query, passage, teacher = make_inputs()
    teacher = teacher if with_teacher else None
    temperature = 0.05
    ref = run_seed(float64_backbone, query, passage, mode, teacher, normalized, temperature, sub_batch)
    ours = run_ours(float64_backbone, query, passage, mode, teacher, normalized, temperature, sub_batch)
    assert rel_err(ours[0], ref[0]) <= 1e-10
    assert rel_err(ours[2], ref[2]) <= 1e-10
    assert ours[2].abs().sum() > 0
    # Right-padded twins give the same loss and gradients.
    query_r, passage_r, _ = make_inputs(padding_side="right")
    right = run_ours(float64_backbone, query_r, passage_r, mode, teacher, normalized, temperature, sub_batch)
    assert rel_err(right[0], ref[0]) <= 1e-10
    assert rel_err(right[2], ref[2]) <= 1e-10


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["normal", "custom"])
def test_matches_seed_float32(arch, mode):
    backbone = tiny_backbone(arch, dtype=torch.float32)
    query, passage, teacher = make_inputs(seed=5)
    teacher = teacher if mode == "normal" else None
    ref = run_seed(backbone, query, passage, mode, teacher, True, 0.02, -1)
    ours = run_ours(backbone, query, passage, mode, teacher, True, 0.02, -1)
    assert rel_err(ours[0], ref[0]) <= tol(torch.float32)
    assert rel_err(ours[2], ref[2]) <= tol(torch.float32)
    query_r, passage_r, _ = make_inputs(padding_side="right", seed=5)
    right = run_ours(backbone, query_r, passage_r, mode, teacher, True, 0.02, -1)
    assert rel_err(right[2], ref[2]) <= tol(torch.float32)


def test_not_in_batch_message_is_custom(float64_backbone):
    query, passage, _ = make_inputs()
    a = run_ours(float64_backbone, query, passage, "custom", None, True, 0.05, -1)
    b = run_ours(float64_backbone, query, passage, "not in-batch", None, True, 0.05, -1)
    assert rel_err(b[0], a[0]) == 0 and rel_err(b[2], a[2]) == 0
    assert a[1].shape == (B, G)


def test_mixed_padding_rows_pool_their_own_last_token(float64_backbone):
    """A batch whose rows are padded on different sides embeds each row like it does alone."""
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=True).eval()
    left, seqs = random_batch(4, 3, 10, seed=3, padding_side="left")
    right, _ = random_batch(4, 3, 10, seed=3, padding_side="right")
    mixed = {k: torch.cat([left[k][:2], right[k][2:]]) for k in left}
    with torch.no_grad():
        e_left, e_mixed = model.encode(left), model.encode(mixed)
        e_alone = torch.cat([model.encode({"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}) for s in seqs])
    assert rel_err(e_mixed, e_left) <= 1e-10
    # "end_aligned" (the seed's positions) moves a row by the batch's padding: RoPE is
    # relative, so only its float32 cos/sin tables differ (~1e-8). "from_zero" is exact.
    assert rel_err(e_alone, e_left) <= 1e-6
    model.position_policy = "from_zero"
    with torch.no_grad():
        e_left0 = model.encode(left)
        e_alone0 = torch.cat([model.encode({"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}) for s in seqs])
    assert rel_err(e_alone0, e_left0) <= 1e-10


def test_eval_mode_scores_without_loss(float64_backbone):
    query, passage, _ = make_inputs()
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=True, temperature=0.02).eval()
    with torch.no_grad():
        out = model(query=query, passage=passage, messages=["normal"])
    assert out.loss is None
    torch.testing.assert_close(out.scores, out.q_reps @ out.p_reps.T)


def test_encode_accepts_list_of_sub_batches(float64_backbone):
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=True).eval()
    feats, _ = random_batch(6, 3, 9, seed=4)
    parts = [{k: v[:2] for k, v in feats.items()}, {k: v[2:] for k, v in feats.items()}]
    with torch.no_grad():
        assert rel_err(model.encode(parts), model.encode(feats)) <= 1e-10


def test_unnormalized_resets_temperature_with_warning(float64_backbone, caplog):
    with caplog.at_level(logging.WARNING):
        model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=False, temperature=0.02)
    assert model.temperature == 1.0
    assert "reset to 1.0" in caplog.text


def test_seed_spelling_normlized(float64_backbone):
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normlized=True, temperature=0.02)
    assert model.normalized and model.normlized and model.temperature == 0.02
    with pytest.raises(ValueError, match="disagree"):
        BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=False, normlized=True)


def test_custom_mode_ignores_teacher_by_default_and_can_distil(float64_backbone, caplog):
    query, passage, teacher = make_inputs()
    plain = run_ours(float64_backbone, query, passage, "custom", None, True, 0.05, -1)
    with caplog.at_level(logging.WARNING):
        ignored = run_ours(float64_backbone, query, passage, "custom", teacher, True, 0.05, -1)
    assert "ignored" in caplog.text
    assert rel_err(ignored[0], plain[0]) == 0
    used = run_ours(float64_backbone, query, passage, "custom", teacher, True, 0.05, -1, distill_in_custom_mode=True)
    assert used[0] > plain[0]


def test_distillation_options(float64_backbone):
    """Teacher temperature, weight and KL behave as documented against a hand computation."""
    import torch.nn.functional as F

    query, passage, teacher = make_inputs()
    model = BiEncoderModel(
        model=float64_backbone, tokenizer=None, normalized=True, temperature=0.05,
        teacher_temperature=0.5, distill_weight=0.3, distill_loss="kl",
    ).train()
    out = model(query=query, passage=passage, messages=["normal"], teacher_scores=teacher)
    q, p = out.q_reps.detach(), out.p_reps.detach()
    scores = q @ p.T / 0.05
    target = torch.arange(B) * G
    ce = F.cross_entropy(scores, target)
    local = torch.stack([scores[i, i * G : (i + 1) * G] for i in range(B)])
    t = F.softmax(torch.tensor(teacher, dtype=torch.float64).view(B, G) / 0.5, dim=-1)
    kl = (t * (t.log() - F.log_softmax(local, -1))).sum(-1).mean()
    assert rel_err(out.loss.detach(), ce + 0.3 * kl) <= 1e-10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(passage_rows=7), "multiple of query count"),
        (dict(teacher=[0.1] * 5), "one score per passage"),
        (dict(messages=["bogus"]), "messages must be"),
        (dict(drop_mask=True), "attention_mask"),
    ],
)
def test_bad_input_errors(float64_backbone, kwargs, match):
    query, passage, teacher = make_inputs()
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=True).train()
    if "passage_rows" in kwargs:
        passage = {k: v[: kwargs["passage_rows"]] for k, v in passage.items()}
    if kwargs.get("drop_mask"):
        query = {"input_ids": query["input_ids"]}
    with pytest.raises(ValueError, match=match):
        model(query=query, passage=passage, messages=kwargs.get("messages", ["normal"]), teacher_scores=kwargs.get("teacher"))


def test_cross_device_without_process_group_is_an_error(float64_backbone):
    with pytest.raises(ValueError, match="process group"):
        BiEncoderModel(model=float64_backbone, tokenizer=None, negatives_cross_device=True)


def test_false_negative_mask_removes_duplicates(float64_backbone):
    """Masking a passage equals deleting it from the softmax; no mask = the seed's loss."""
    import torch.nn.functional as F

    query, passage, _ = make_inputs()
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=True, temperature=0.05).train()
    mask = torch.zeros(B, B * G, dtype=torch.bool)
    mask[0, 5] = True
    mask[0, 0] = True  # the target itself is never masked
    out = model(query=query, passage=passage, messages=["normal"], false_negative_mask=mask)
    scores = (out.q_reps @ out.p_reps.T / 0.05).detach()
    keep = [j for j in range(B * G) if j != 5]
    row0 = F.cross_entropy(scores[0:1, keep], torch.tensor([0]))
    rest = F.cross_entropy(scores[1:], torch.arange(1, B) * G, reduction="sum")
    assert rel_err(out.loss.detach(), (row0 + rest) / B) <= 1e-10


@pytest.mark.parametrize("mode,with_teacher", [("normal", False), ("normal", True), ("custom", False)])
@pytest.mark.parametrize("chunking", [dict(grad_cache_chunk_size=2), dict(grad_cache_max_tokens=24)])
def test_grad_cache_equals_plain_step(float64_backbone, mode, with_teacher, chunking):
    query, passage, teacher = make_inputs()
    teacher = teacher if with_teacher else None
    plain = run_ours(float64_backbone, query, passage, mode, teacher, True, 0.05, -1)
    cached = run_ours(float64_backbone, query, passage, mode, teacher, True, 0.05, -1, grad_cache=True, **chunking)
    assert rel_err(cached[0], plain[0]) <= 1e-10
    assert rel_err(cached[2], plain[2]) <= 1e-10


def test_grad_cache_replays_dropout():
    """With dropout on, the re-encoding sees the same masks as the cached pass."""
    backbone = tiny_backbone("llama", dtype=torch.float64, dropout=0.3)
    query, passage, _ = make_inputs()
    torch.manual_seed(123)
    plain = run_ours(backbone, query, passage, "normal", None, True, 0.05, 2)
    torch.manual_seed(123)
    cached = run_ours(backbone, query, passage, "normal", None, True, 0.05, -1, grad_cache=True, grad_cache_chunk_size=2)
    assert rel_err(cached[2], plain[2]) <= 1e-10


def test_grad_cache_scales_with_loss_multiplier(float64_backbone):
    """(loss / 4).backward() gives a quarter of the gradient, as with a plain loss (accumulation)."""
    query, passage, _ = make_inputs()
    model = BiEncoderModel(model=float64_backbone, tokenizer=None, normalized=True, temperature=0.05, grad_cache=True).train()
    float64_backbone.zero_grad(set_to_none=True)
    (model(query=query, passage=passage, messages=["normal"]).loss / 4).backward()
    quarter = flat_grads(float64_backbone)
    full = run_ours(float64_backbone, query, passage, "normal", None, True, 0.05, -1)[2]
    assert rel_err(quarter * 4, full) <= 1e-10


def test_grad_cache_with_gradient_checkpointing_and_lora():
    from peft import LoraConfig, get_peft_model

    backbone = tiny_backbone("qwen2", dtype=torch.float64)
    lora = get_peft_model(backbone, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    query, passage, _ = make_inputs()
    plain = run_ours(lora, query, passage, "normal", None, True, 0.05, -1)
    model = BiEncoderModel(model=lora, tokenizer=None, normalized=True, temperature=0.05, grad_cache=True, grad_cache_chunk_size=3)
    model.gradient_checkpointing_enable()
    model.train()
    lora.zero_grad(set_to_none=True)
    out = model(query=query, passage=passage, messages=["normal"])
    out.loss.backward()
    assert rel_err(out.loss.detach(), plain[0]) <= 1e-10
    assert rel_err(flat_grads(lora), plain[2]) <= 1e-10
