"""`denselm encode`: shards, resume after a crash, two ranks, bad input; inference == training path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import WORDS, make_tokenizer, write_jsonl
from tiny_models import tiny_backbone

from denselm.cli import main as cli_main
from denselm.encode import PLAN_NAME
from denselm.io import faults
from denselm.embeddings import EMBEDDINGS_MANIFEST as MANIFEST_NAME, list_shards, load_embeddings, shard_paths

PROMPT = "Given a fruit, retrieve its passage"


def save_tiny_denselm(path: Path, arch: str = "llama", template: str = "bge-icl", **manifest) -> Path:
    """A denselm output folder around a random tiny decoder (normalised, last token)."""
    from denselm.model.encoder import BiEncoderModel

    tok = make_tokenizer()
    backbone = tiny_backbone(arch, vocab_size=len(tok))
    settings = {"template": template, "prompt": PROMPT, "query_max_len": 32, "passage_max_len": 48, **manifest}
    BiEncoderModel(model=backbone, tokenizer=tok, normalized=True, manifest=settings).save(path)
    return path


def corpus_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 11)]  # lengths 3..13
        rows.append({"_id": f"d{i}", "title": WORDS[i % len(WORDS)] if i % 3 else "", "text": " ".join(words)})
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_denselm(tmp_path_factory.mktemp("enc") / "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_rows(11))


def encode_cli(model_dir, corpus, out, *extra) -> int:
    return cli_main(["encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(corpus), "--output", str(out),
                     "--shard-size", "3", "--device", "cpu", *extra])


def stamps(folder: Path) -> dict[int, tuple[int, int]]:
    """(inode, mtime) of each shard's .npy: a rewritten shard gets a new inode (atomic replace)."""
    return {i: (shard_paths(folder, i)[0].stat().st_ino, shard_paths(folder, i)[0].stat().st_mtime_ns)
            for i in list_shards(folder)}


def test_encode_shards_match_encoder(tmp_path, model_dir, corpus):
    from denselm.beir import read_corpus
    from denselm.inference import load_encoder

    out = tmp_path / "emb"
    assert encode_cli(model_dir, corpus, out) == 0
    assert list_shards(out) == [0, 1, 2, 3]  # 11 rows in shards of 3
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (manifest["count"], manifest["dim"], manifest["dtype"], manifest["kind"]) == (11, 64, "float32", "corpus")
    assert manifest["model"] == str(model_dir.resolve())
    ids, emb = load_embeddings(out)
    doc_ids, texts = read_corpus(corpus)
    assert ids == doc_ids
    assert json.loads(shard_paths(out, 3)[1].read_text()) == ["d9", "d10"]
    # The same numbers as encoding the whole corpus in one call (other batches: float tolerance).
    ref = load_encoder(model_dir, device="cpu", show_progress=False).encode_corpus(texts)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # queries: formatted with the manifest's instruction, or another one
    q_out, q2_out = tmp_path / "q", tmp_path / "q2"
    assert encode_cli(model_dir, corpus, q_out, "--kind", "queries", "--fp16") == 0
    assert encode_cli(model_dir, corpus, q2_out, "--kind", "queries", "--instruction", "Find the text") == 0
    _, q = load_embeddings(q_out)
    _, q2 = load_embeddings(q2_out)
    assert np.load(shard_paths(q_out, 0)[0]).dtype == np.float16
    plain = [r["text"] for r in corpus_rows(11)]  # queries ignore titles
    enc = load_encoder(model_dir, device="cpu", show_progress=False)
    np.testing.assert_allclose(q, enc.encode_queries(plain), atol=2e-3)  # float16 storage
    np.testing.assert_allclose(q2, enc.encode_queries(plain, instruction="Find the text"), atol=1e-5)
    assert not np.allclose(q2, enc.encode_queries(plain), atol=1e-2)


def test_crash_then_resume_computes_only_missing_shards(tmp_path, model_dir, corpus, monkeypatch):
    clean = tmp_path / "clean"
    assert encode_cli(model_dir, corpus, clean) == 0
    out = tmp_path / "emb"
    with faults("encode.shard:crash@2"), pytest.raises(RuntimeError, match="simulated crash"):
        encode_cli(model_dir, corpus, out)
    assert list_shards(out) == [0, 1] and not (out / MANIFEST_NAME).exists()
    with pytest.raises(ValueError, match="did not finish"):
        load_embeddings(out)  # an interrupted folder never looks complete
    before = stamps(out)
    assert encode_cli(model_dir, corpus, out) == 0
    after = stamps(out)
    assert {i: after[i] for i in (0, 1)} == before  # untouched
    assert sorted(after) == [0, 1, 2, 3]
    ids, emb = load_embeddings(out)
    ref_ids, ref = load_embeddings(clean)
    assert ids == ref_ids and np.array_equal(emb, ref)  # same batches per shard: bit-identical

    # A complete folder that lost a shard: the manifest goes while it is recomputed, then returns.
    shard_paths(out, 2)[0].unlink()
    before = stamps(out)
    assert encode_cli(model_dir, corpus, out) == 0
    after = stamps(out)
    assert all(after[i] == before[i] for i in (0, 1, 3)) and 2 in after
    assert np.array_equal(load_embeddings(out)[1], ref)


def test_rerun_with_other_settings_is_refused(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "emb"
    assert encode_cli(model_dir, corpus, out) == 0
    plan = (out / PLAN_NAME).read_text()
    assert encode_cli(model_dir, corpus, out, "--kind", "queries") == 2
    assert "holds an encoding with other settings" in capsys.readouterr().err
    assert cli_main(["encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(corpus), "--output", str(out),
                     "--shard-size", "5", "--device", "cpu"]) == 2
    assert "shard_size: 3 -> 5" in capsys.readouterr().err
    assert (out / PLAN_NAME).read_text() == plan and (out / MANIFEST_NAME).exists()
    # a plan with no shard under it (a run that failed before its first shard) may be replaced
    for i in list_shards(out):
        shard_paths(out, i)[0].unlink()
    (out / MANIFEST_NAME).unlink()
    assert cli_main(["encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(corpus), "--output", str(out),
                     "--shard-size", "5", "--device", "cpu"]) == 0
    assert json.loads((out / PLAN_NAME).read_text())["shard_size"] == 5 and list_shards(out) == [0, 1, 2]


@pytest.mark.parametrize("has_bf16_units", [True, False])
def test_default_dtype_is_auto_and_a_resume_must_match_it(tmp_path, model_dir, corpus, capsys, monkeypatch,
                                                          has_bf16_units):
    """`denselm encode` defaults to --dtype auto: bf16 weights on a CPU with bf16 matrix units, else fp32.
    The weights' dtype is in the plan, so an encoding is never resumed in another dtype."""
    from denselm import inference

    monkeypatch.setattr(inference, "cpu_has_bf16_matmul", lambda: has_bf16_units)
    out = tmp_path / "emb"
    assert cli_main(["encode", "--model", str(model_dir), "--input", str(corpus), "--output", str(out),
                     "--shard-size", "3", "--device", "cpu"]) == 0
    weights = "bfloat16" if has_bf16_units else "float32"
    assert json.loads((out / PLAN_NAME).read_text())["weights_dtype"] == weights
    other = "float32" if has_bf16_units else "bfloat16"
    assert encode_cli(model_dir, corpus, out, "--dtype", other) == 2  # encode_cli passes float32; the last flag wins
    assert f"weights_dtype: '{weights}' -> '{other}'" in capsys.readouterr().err


def test_bad_input(tmp_path, model_dir, capsys):
    rows = corpus_rows(3)
    dup = write_jsonl(tmp_path / "dup.jsonl", rows + [{"_id": "d1", "text": "again"}])
    assert encode_cli(model_dir, dup, tmp_path / "o1") == 2
    assert f"{dup}:4: duplicate _id 'd1' (first on line 2)" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert encode_cli(model_dir, empty, tmp_path / "o2") == 2
    assert "empty corpus" in capsys.readouterr().err
    assert encode_cli(model_dir, empty, tmp_path / "o2q", "--kind", "queries") == 2
    assert "empty input" in capsys.readouterr().err
    no_prompt = save_tiny_denselm(tmp_path / "np", template="e5-mistral", prompt=None)
    assert encode_cli(no_prompt, write_jsonl(tmp_path / "q.jsonl", rows), tmp_path / "o5", "--kind", "queries") == 2
    assert "pass --instruction" in capsys.readouterr().err
    missing_text = write_jsonl(tmp_path / "bad.jsonl", [{"_id": "a", "text": "x"}, {"_id": "b"}])
    assert encode_cli(model_dir, missing_text, tmp_path / "o3") == 2
    assert f"{missing_text}:2: missing field 'text'" in capsys.readouterr().err
    # a plain folder: neither a denselm manifest nor a preset
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    assert encode_cli(plain, good, tmp_path / "o4") == 2
    err = capsys.readouterr().err
    assert "has no denselm.json" in err and "preset" in err and "qwen3-embedding" in err
    # nothing was written for any failed run
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4, 5)) and not (tmp_path / "o2q").exists()


@pytest.mark.timeout(300)
def test_two_ranks_equal_one(tmp_path, model_dir, corpus):
    one = tmp_path / "one"
    assert encode_cli(model_dir, corpus, one) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "denselm.cli", "encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(corpus), "--output", str(two),
           "--shard-size", "3", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 encoded shards 0 and 2, rank 1 shards 1 and 3 (round robin)
    assert "rank 0: encoded 2 shard(s)" in proc.stderr and "rank 1: encoded 2 shard(s)" in proc.stderr
    ids1, emb1 = load_embeddings(one)
    ids2, emb2 = load_embeddings(two)
    assert ids1 == ids2
    np.testing.assert_allclose(emb2, emb1, atol=1e-6, rtol=0)  # thread counts may differ from this process
    assert json.loads((two / MANIFEST_NAME).read_text())["count"] == 11


# ------------------------------------------------------------------ inference path == training path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inference_path_equals_training_path(tmp_path, arch):
    """Encoder.encode_queries/encode_corpus and the training collator + BiEncoderModel.encode agree.

    Covers truncation (fit_queries cuts the query before the suffix), in-context examples, and both
    padding sides on either path.
    """
    from denselm.data.collate import Group, collate_groups
    from denselm.data.config import DataConfig
    from denselm.data.formats import TASK_TYPES
    from denselm.inference import load_encoder
    from denselm.data.templates import ICLExample

    model_dir = save_tiny_denselm(tmp_path / "m", arch=arch, query_max_len=64, passage_max_len=20)
    long_text = " ".join(WORDS * 2)  # longer than both limits: truncated on both paths
    queries = ["apple banana", "what is the dict error", long_text]
    passages = ["the apple is red", long_text, "a b c", "grape lemon mango orange pear plum"]
    groups = [Group(query=q, prompt=None, passages=passages[:2] if i % 2 else passages[2:], scores=None,
                    icl_response="a b c") for i, q in enumerate(queries)]
    groups[0].examples = [1]  # query 0 gets query 1's pair as an in-context example
    spec = TASK_TYPES["normal"]
    for enc_side in ("left", "right"):
        enc = load_encoder(model_dir, device="cpu", show_progress=False, padding_side=enc_side, batch_size=2)
        q_inf = enc.encode_queries(queries[1:])  # no examples
        q_icl = enc.encode_queries(queries[:1], examples=[ICLExample(PROMPT, queries[1], "a b c")])
        flat = [p for g in groups for p in g.passages]
        p_inf = enc.encode_corpus(flat)
        for train_side in ("left", "right"):
            cfg = DataConfig(template="bge-icl", prompt=PROMPT, query_max_len=64, passage_max_len=20,
                             padding_side=train_side, icl_max_examples=1, icl_token_budget=48,
                             example_query_max_len=64, example_passage_max_len=64, num_workers=0)
            batch = collate_groups(groups, enc.tokenizer, cfg, spec, "normal", "test")
            assert batch.num_icl_examples == 1 and batch.num_truncated_queries >= 1
            with torch.no_grad():
                q_train = enc.model.encode(batch.query).numpy()
                p_train = enc.model.encode(batch.passage).numpy()
            cos_q = np.sum(q_train[1:] * q_inf, axis=1)  # both normalised
            cos_icl = float(np.sum(q_train[0] * q_icl[0]))
            cos_p = np.sum(p_train * p_inf, axis=1)
            assert cos_q.min() >= 0.9999 and cos_icl >= 0.9999 and cos_p.min() >= 0.9999, (enc_side, train_side)
    # the ICL example really changed the query (the check above is not vacuous)
    assert float(np.sum(q_icl[0] * enc.encode_queries(queries[:1])[0])) < 0.999


def test_tokenisation_overlapped_in_blocks_gives_the_same_embeddings(model_dir):
    """Blocks tokenised in a thread while the previous block encodes: same result as one block."""
    from denselm.inference import load_encoder

    enc = load_encoder(model_dir, device="cpu", show_progress=False)
    texts = [f"text number {i} " + "word " * (i % 13) for i in range(37)]
    whole = enc.encode_corpus(texts)
    queries = enc.encode_queries(texts[:11], instruction="find it")
    enc.tokenize_block = 5  # 8 blocks, each prefetched while the one before encodes
    np.testing.assert_allclose(enc.encode_corpus(texts), whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enc.encode_queries(texts[:11], instruction="find it"), queries, rtol=0, atol=1e-6)
