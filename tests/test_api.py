"""The Python API (`denselm.load_encoder`): same numbers as `denselm encode`, sentence-transformers-style flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_helpers import WORDS, make_tokenizer, write_jsonl
from tiny_models import tiny_backbone

import denselm
from denselm.cli import main as cli_main
from denselm.embeddings import load_embeddings

PROMPT = "Given a fruit, retrieve its passage"


def save_tiny(path, normalized: bool = True, **manifest):
    from denselm.model.encoder import BiEncoderModel

    tok = make_tokenizer()
    settings = {"template": "bge-icl", "prompt": PROMPT, "query_max_len": 32, "passage_max_len": 48, **manifest}
    BiEncoderModel(model=tiny_backbone("llama", vocab_size=len(tok)), tokenizer=tok, normalized=normalized,
                   manifest=settings).save(path)
    return path


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + (i * 5) % 13)]  # lengths 2..14
        out.append({"_id": f"d{i}", "title": WORDS[i % len(WORDS)] if i % 3 else "", "text": " ".join(words)})
    return out


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("api") / "model")


@pytest.fixture(scope="module")
def enc(model_dir):
    return denselm.load(model_dir, device="cpu", show_progress=False)


def test_alias_and_exports():
    assert denselm.load is denselm.load_encoder
    from denselm.inference import Encoder

    assert denselm.Encoder is Encoder


def test_equals_denselm_encode_for_corpus_and_queries(tmp_path, model_dir, enc):
    docs = rows(13)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"_id": d["_id"], "text": d["text"]} for d in docs])
    for kind, path in (("corpus", corpus), ("queries", queries)):
        assert cli_main(["encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(path), "--output",
                         str(tmp_path / kind), "--kind", kind, "--device", "cpu"]) == 0
    _, cli_docs = load_embeddings(tmp_path / "corpus")
    _, cli_queries = load_embeddings(tmp_path / "queries")
    # BEIR dicts straight from the file's rows (extra keys such as _id are ignored).
    np.testing.assert_allclose(enc.encode_corpus(docs, show_progress_bar=False), cli_docs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enc.encode_queries([d["text"] for d in docs]), cli_queries, rtol=0, atol=1e-6)


def test_results_in_input_order(enc):
    texts = [" ".join(WORDS[: 1 + (i * 11) % 17]) for i in range(12)]  # lengths shuffled, so sorting reorders
    together = enc.encode_corpus(texts, batch_size=5)
    alone = np.stack([enc.encode_corpus(t) for t in texts])
    # Each row is its own text's vector (other batches: float tolerance for end-aligned positions).
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)
    cos = together @ alone.T
    assert (cos.argmax(axis=1) == np.arange(len(texts))).all()
    q = enc.encode_queries(texts[::-1], batch_size=3)
    np.testing.assert_allclose(q[::-1], enc.encode_queries(texts), rtol=0, atol=1e-4)


def test_prompt_overrides_the_saved_instruction(enc):
    qs = ["apple pie", "pear"]
    saved = enc.encode_queries(qs)
    np.testing.assert_array_equal(enc.encode_queries(qs, prompt=PROMPT), saved)
    other = enc.encode_queries(qs, prompt="Find the recipe")
    assert np.abs(other - saved).max() > 1e-2
    np.testing.assert_array_equal(enc.encode_queries(qs, instruction="Find the recipe"), other)
    with pytest.raises(ValueError, match="not two different"):
        enc.encode_queries(qs, prompt="a", instruction="b")
    # encode(): a prompt or input_type="query" makes queries; plain encode() is the passage route.
    np.testing.assert_array_equal(enc.encode(qs, prompt="Find the recipe"), other)
    np.testing.assert_array_equal(enc.encode(qs, input_type="query"), saved)
    np.testing.assert_array_equal(enc.encode(qs), enc.encode_corpus(qs))
    np.testing.assert_array_equal(enc.encode_query(qs), saved)
    np.testing.assert_array_equal(enc.encode_document(qs), enc.encode_corpus(qs))
    assert np.abs(saved - enc.encode_corpus(qs)).max() > 1e-2  # queries carry the template


def test_tensor_and_numpy_outputs(enc):
    texts = ["apple", "banana cherry date"]
    arr = enc.encode_corpus(texts)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 64) and arr.dtype == np.float32
    t = enc.encode_corpus(texts, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 64) and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), arr)
    rows_ = enc.encode_corpus(texts, convert_to_numpy=False)
    assert isinstance(rows_, list) and all(isinstance(r, torch.Tensor) and r.shape == (64,) for r in rows_)
    one = enc.encode_corpus("apple")
    assert one.shape == (64,)
    close(one, arr[0])  # alone vs in a batch: float rounding only
    assert enc.encode_queries("apple", convert_to_tensor=True).shape == (64,)


def test_normalize_embeddings_on_an_unnormalised_model(tmp_path):
    enc = denselm.load(save_tiny(tmp_path / "raw", normalized=False), device="cpu", show_progress=False)
    raw = enc.encode_corpus(["apple", "pear plum"])
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-2
    unit = enc.encode_corpus(["apple", "pear plum"], normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_dict_and_str_corpus_entries(enc):
    mixed = enc.encode_corpus([{"title": "apple", "text": "red fruit"}, "red fruit", {"text": "red fruit"},
                               {"title": None, "text": "pear"}])
    close(mixed[0], enc.encode_corpus("apple red fruit"))
    np.testing.assert_array_equal(mixed[1], mixed[2])  # same batch, same length: bitwise
    close(mixed[3], enc.encode_corpus("pear"))
    close(enc.encode_corpus({"title": "apple", "text": "red fruit"}), mixed[0])
    with pytest.raises(ValueError, match="'text'"):
        enc.encode_corpus([{"title": "apple"}])
    with pytest.raises(TypeError, match="str or a dict"):
        enc.encode_corpus([3])
    with pytest.raises(ValueError, match="empty"):
        enc.encode_corpus([])


def test_similarity(enc):
    q = enc.encode_queries(["apple", "pear"])
    p = enc.encode_corpus(["apple pie", "pear", "plum jam"])
    s = enc.similarity(q, p)
    assert isinstance(s, np.ndarray) and s.shape == (2, 3)
    np.testing.assert_allclose(s, q @ p.T, atol=1e-6)
    st = enc.similarity(torch.from_numpy(q), p)
    assert isinstance(st, torch.Tensor)
    np.testing.assert_allclose(st.numpy(), s, atol=1e-6)
    assert enc.similarity(q[0], p).shape == (1, 3)


def test_dtype_on_load(model_dir):
    enc = denselm.load_encoder(model_dir, device="cpu", dtype="bf16", show_progress=False)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    ref = denselm.load_encoder(model_dir, device="cpu", dtype=torch.float32, show_progress=False)
    a, b = enc.encode_corpus(["apple pie"]), ref.encode_corpus(["apple pie"])
    assert a.dtype == np.float32 and float(a[0] @ b[0]) > 0.99
    with pytest.raises(ValueError, match="dtype must be"):
        denselm.load_encoder(model_dir, device="cpu", dtype="int8")
