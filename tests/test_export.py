"""`denselm export`: merged LoRA weights, and sentence-transformers folders that match denselm's embeddings.

Tiny random decoders whose vocabulary matches real tokenizers (tests/tokenizer_fixtures.py):
Qwen3 (no BOS, pad == eos, byte-level offsets step) and SmolLM2 with the Llama-style BOS/EOS
post-processor.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from tiny_models import tiny_backbone
from tokenizer_fixtures import fixture_tokenizer

from denselm.cli import main as cli_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Given a question, retrieve the passage that answers it"
QUERIES = ["how do I sort a dict by value?", "What is a lambda", "read a file line by line"]
DOCS = ["Use sorted(d.items(), key=lambda kv: kv[1]).", "A lambda is a small anonymous function.",
        "for line in open(path): print(line)", "Ünïcode and emoji 🐍 text\nwith a newline"]


def make_lora_model(root, tokenizer_name: str, arch: str, template: str, prompt: str | None = PROMPT):
    """base folder + a denselm LoRA folder (random, non-zero adapter) -> (lora folder, Encoder of the same model).

    The Encoder wraps the in-memory model (as saved): real tokenizers take seconds to load.
    """
    from denselm.inference import Encoder

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from denselm.model.encoder import BiEncoderModel

    tok = fixture_tokenizer(tokenizer_name)  # the shared instance: saving does not change it
    base = root / "base"
    backbone = tiny_backbone(arch, vocab_size=len(tok))
    backbone.config.eos_token_id = tok.eos_token_id
    backbone.save_pretrained(base)
    tok.save_pretrained(base)
    torch.manual_seed(1)
    peft = get_peft_model(AutoModel.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False))
    # ST has one max_seq_length (the passage limit): the test queries fit in 32 tokens
    manifest = {"template": template, "prompt": prompt, "query_max_len": 64, "passage_max_len": 32}
    model = BiEncoderModel(model=peft, tokenizer=tok, normalized=True, manifest=manifest)
    model.save(root / "lora")
    return root / "lora", Encoder(model)


@pytest.fixture(scope="module")
def qwen_lora(tmp_path_factory):
    return make_lora_model(tmp_path_factory.mktemp("qwen"), "qwen3", "qwen2", "qwen3-embedding")


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    return make_lora_model(tmp_path_factory.mktemp("llama"), "smollm2-bos-eos", "llama", "bge-icl")


def encoder(path):
    from denselm.inference import load_encoder

    return load_encoder(path, device="cpu", show_progress=False)


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_merged_export_equals_lora(tmp_path, llama_lora):
    from transformers import AutoModel

    llama_lora, lora = llama_lora
    out = tmp_path / "merged"
    assert cli_main(["export", "--model", str(llama_lora), "--output", str(out), "--format", "merged"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "denselm.json"} <= files
    assert not any(f.startswith("adapter") for f in files)
    assert json.loads((out / "denselm.json").read_text())["adapter"] is False
    AutoModel.from_pretrained(out)  # a plain transformers folder
    merged = encoder(out)
    np.testing.assert_allclose(merged.encode_corpus(DOCS), lora.encode_corpus(DOCS), atol=1e-5)
    np.testing.assert_allclose(merged.encode_queries(QUERIES), lora.encode_queries(QUERIES), atol=1e-5)
    # the adapter matters (the comparison above is not between two copies of the base)
    base = encoder_plain(llama_lora.parent / "base", lora)
    assert cos_rows(base.encode_corpus(DOCS), lora.encode_corpus(DOCS)).max() < 0.999
    # an existing output is not overwritten without --force, and replaced with it
    assert cli_main(["export", "--model", str(llama_lora), "--output", str(out)]) == 2
    assert cli_main(["export", "--model", str(llama_lora), "--output", str(out), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def encoder_plain(path, like):
    from transformers import AutoModel

    from denselm.inference import Encoder
    from denselm.model.encoder import BiEncoderModel

    m = BiEncoderModel(model=AutoModel.from_pretrained(path), tokenizer=like.tokenizer, normalized=True,
                       manifest=like.model.manifest)
    return Encoder(m)


def load_st(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def test_st_export_qwen_matches_denselm(tmp_path, qwen_lora):
    qwen_lora, enc = qwen_lora
    out = tmp_path / "st"
    assert cli_main(["export", "--model", str(qwen_lora), "--output", str(out), "--format", "sentence-transformers"]) == 0
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": f"Instruct: {PROMPT}\nQuery:", "document": ""}
    assert cfg["similarity_fn_name"] == "cosine"
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    st = load_st(out)
    q = st.encode(QUERIES, prompt_name="query", batch_size=2)
    d = st.encode(DOCS, prompt_name="document", batch_size=2)
    assert cos_rows(q, enc.encode_queries(QUERIES)).min() >= 0.9999
    assert cos_rows(d, enc.encode_corpus(DOCS)).min() >= 0.9999
    # the tokenizer ST calls appends EOS (Qwen's own does not), pads on the left
    tok = st.tokenizer
    eos = enc.tokenizer.eos_token_id
    ids = tok("hello world")["input_ids"]
    assert ids == enc.tokenizer("hello world", add_special_tokens=False)["input_ids"] + [eos]
    assert tok.padding_side == "left"
    # truncation: the post-processor's EOS is reserved, so a long passage is cut exactly as denselm cuts it
    long_doc = " ".join(["lorem ipsum dolor"] * 30)
    feats = st[0].preprocess([long_doc])
    assert feats["input_ids"][0].tolist() == enc.passage_ids([long_doc])[0] and len(feats["input_ids"][0]) == 32
    dl = st.encode([long_doc], prompt_name="document")
    assert cos_rows(dl, enc.encode_corpus([long_doc]))[0] >= 0.9999


def test_st_export_llama_bge_icl(tmp_path, llama_lora, caplog):
    llama_lora, enc = llama_lora
    out = tmp_path / "st"
    with caplog.at_level(logging.WARNING, logger="denselm.export"):
        assert cli_main(["export", "--model", str(llama_lora), "--output", str(out),
                         "--format", "sentence-transformers"]) == 0
    assert any("puts '\\nResponse:' after each query" in r.getMessage() for r in caplog.records)
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"]["query"] == f"Instruct: {PROMPT}\nQuery: "
    st = load_st(out)
    q = st.encode([t + "\nResponse:" for t in QUERIES], prompt_name="query", batch_size=2)
    d = st.encode(DOCS, prompt_name="document", batch_size=2)
    assert cos_rows(q, enc.encode_queries(QUERIES)).min() >= 0.9999
    assert cos_rows(d, enc.encode_corpus(DOCS)).min() >= 0.9999
    # without the suffix the query embedding differs: the limitation is real
    q_bare = st.encode(QUERIES, prompt_name="query", batch_size=2)
    assert cos_rows(q_bare, enc.encode_queries(QUERIES)).max() < 0.999
    # BOS (from the Llama-style tokenizer) kept in front, EOS once at the end
    bos, eos = enc.tokenizer.bos_token_id, enc.tokenizer.eos_token_id
    ids = st.tokenizer("a text")["input_ids"]
    assert ids[0] == bos and ids[-1] == eos and ids.count(eos) == 1
    assert "add_eos_token" not in json.loads((out / "tokenizer_config.json").read_text())
    # the exported folder still loads in denselm, with the same numbers
    np.testing.assert_allclose(encoder(out).encode_corpus(DOCS), enc.encode_corpus(DOCS), atol=1e-5)


def test_suffix_as_fixed_tokens_is_not_exact_for_bpe():
    """Why bge-icl's suffix is not put into the post-processor: Qwen's pre-tokenizer glues '?' to '\\n'."""
    tok = fixture_tokenizer("qwen3")
    suffix = "\nResponse:"

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    suffix_ids = ids("x" + suffix)[len(ids("x")):]  # the suffix after a plain word
    assert ids("what is x" + suffix) == ids("what is x") + suffix_ids  # fine after a letter
    assert ids("what is x?" + suffix) != ids("what is x?") + suffix_ids  # '?\n' is one piece


def test_export_other_templates_and_bad_input(tmp_path, capsys):
    from tiny_models import make_model_dir

    from denselm.export import st_prompts

    assert st_prompts("e5-mistral", "Find it", "") == ("Instruct: Find it\nQuery: ", "", "")
    assert st_prompts("none", None, "passage: ") == ("", "passage: ", "")
    assert st_prompts("bge-icl-special", "Find it") == ("<instruct>Find it\n<query>", "", "\n<response>")
    with pytest.raises(ValueError, match="--instruction"):
        st_prompts("qwen3-embedding", None)
    plain = make_model_dir(tmp_path / "plain")
    assert cli_main(["export", "--model", str(plain), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no denselm.json" in err and "preset" in err
    # a plain folder with a preset exports; the preset's instruction becomes the query prompt
    assert cli_main(["export", "--model", str(plain), "--preset", "e5-mistral", "--output", str(tmp_path / "o"),
                     "--format", "sentence-transformers", "--instruction", "Find the fruit"]) == 0
    cfg = json.loads((tmp_path / "o" / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"]["query"] == "Instruct: Find the fruit\nQuery: "
    # a template that needs an instruction, none saved nor given: one line naming the flag, nothing written
    from test_encode import save_tiny_denselm

    no_prompt = save_tiny_denselm(tmp_path / "np", template="qwen3-embedding", prompt=None)
    before = set(tmp_path.iterdir())
    assert cli_main(["export", "--model", str(no_prompt), "--output", str(tmp_path / "o2"),
                     "--format", "sentence-transformers"]) == 2
    assert "pass --instruction" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before
