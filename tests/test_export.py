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

    from denselm.data.templates import add_template_tokens, get_template

    special = bool(get_template(template).special_tokens)
    tok = fixture_tokenizer(tokenizer_name, fresh=special)  # the shared instance unless tokens are added
    if special:  # <instruct>, <query>, <response> as single tokens (the base vocabulary grows)
        add_template_tokens(tok, template)
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


# Probe texts: short, non-ASCII, and longer than both limits (queries 32, passages 48 tokens below).
PROBE_QUERIES = QUERIES + [
    "Ünïcode query ß 日本語 🐍?",
    " ".join(["why does my long query keep going and going"] * 12),
    "é" * 200,
]
PROBE_DOCS = DOCS + [" ".join(["lorem ipsum dolor sit amet"] * 40), "ü" * 300 + " 日本語" * 20]


def st_export(root, tokenizer_name, arch, template, prompt=PROMPT):
    """A LoRA model with distinct query/passage limits (32 vs 48) exported for sentence-transformers
    through the CLI -> (ST folder, denselm Encoder of the same model)."""
    from denselm.inference import Encoder

    lora, enc = make_lora_model(root, tokenizer_name, arch, template, prompt)
    enc.model.spec = enc.model.spec.replace(query_max_len=32, passage_max_len=48)
    enc = Encoder(enc.model)
    enc.model.save(lora)  # the limits travel in denselm.json
    out = root / "st"
    assert cli_main(["export", "--model", str(lora), "--output", str(out), "--format", "sentence-transformers"]) == 0
    return out, enc


def ids_of(st, texts, task):
    """The token ids sentence-transformers feeds the model, padding removed."""
    feats = st[0].preprocess(texts, task=task)
    return [row[mask.bool()].tolist() for row, mask in zip(feats["input_ids"], feats["attention_mask"])]


ST_CASES = [("qwen3", "qwen2", "qwen3-embedding"), ("qwen3", "qwen2", "bge-icl"),
            ("smollm2-bos-eos", "llama", "bge-icl"), ("smollm2-bos-eos", "llama", "e5-mistral"),
            ("qwen3", "qwen2", "none"), ("qwen3", "qwen2", "bge-icl-special")]


@pytest.mark.parametrize("tokenizer_name,arch,template", ST_CASES)
def test_st_export_stock_encode_matches_denselm(tmp_path, tokenizer_name, arch, template):
    """Stock ``encode_query``/``encode_document`` (texts only) give denselm's vectors: template, suffix,
    per-route max length and EOS, with no manual step."""
    prompt = None if template == "none" else PROMPT
    out, enc = st_export(tmp_path, tokenizer_name, arch, template, prompt)
    st = load_st(out)
    q, d = st.encode_query(PROBE_QUERIES), st.encode_document(PROBE_DOCS)
    # Exact for every passage and every query, cut at the limit or not (suffix templates included).
    st_ids = ids_of(st, PROBE_QUERIES, "query")
    assert sum(len(ids) == 32 for ids in st_ids) >= 2  # the probe cuts some queries
    assert cos_rows(q, enc.encode_queries(PROBE_QUERIES)).min() >= 0.9999
    assert cos_rows(d, enc.encode_corpus(PROBE_DOCS)).min() >= 0.9999
    # token for token, each route cut at its own limit (32 / 48) with EOS last
    assert st_ids == enc.query_ids(PROBE_QUERIES)
    assert ids_of(st, PROBE_DOCS, "document") == enc.passage_ids(PROBE_DOCS)
    assert max(map(len, enc.query_ids(PROBE_QUERIES))) == 32 and max(map(len, enc.passage_ids(PROBE_DOCS))) == 48
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["similarity_fn_name"] == "cosine" and cfg["minimum_sentence_transformers_version"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    # a prompt at encode time replaces the saved instruction, as denselm's prompt= does
    if prompt is not None:
        other = "Find code"  # short: these queries stay within the limit (see the long-query test)
        assert cos_rows(st.encode_query(QUERIES, prompt=other), enc.encode_queries(QUERIES, prompt=other)).min() >= 0.9999
    # the exported folder still loads in denselm, with the same numbers
    np.testing.assert_allclose(encoder(out).encode_queries(PROBE_QUERIES), enc.encode_queries(PROBE_QUERIES), atol=1e-5)


def test_st_export_one_backbone_and_plain_tokenizer_eos(tmp_path, qwen_lora):
    """Two routes, one copy of the weights (folder <= 1.1x the merged one); the tokenizer alone appends EOS."""
    qwen_lora, enc = qwen_lora
    merged, st_out = tmp_path / "merged", tmp_path / "st"
    assert cli_main(["export", "--model", str(qwen_lora), "--output", str(merged)]) == 0
    assert cli_main(["export", "--model", str(qwen_lora), "--output", str(st_out), "--format", "sentence-transformers"]) == 0

    def size(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    assert size(st_out) <= 1.1 * size(merged)
    assert len(list(st_out.rglob("*.safetensors"))) == 1
    st = load_st(st_out)
    eos = enc.tokenizer.eos_token_id
    assert st.tokenizer("hello world")["input_ids"] == enc.tokenizer("hello world", add_special_tokens=False)["input_ids"] + [eos]
    assert st.tokenizer.padding_side == "left"
    assert "add_eos_token" not in json.loads((st_out / "tokenizer_config.json").read_text())


def test_st_export_suffix_on_long_queries(tmp_path):
    """bge-icl's suffix survives truncation token for token: denselm cuts the ids and writes the suffix's
    own ids after them (``query_cut: token``), as sentence-transformers' restore_suffix does, also where
    the cut falls inside a BPE merge ('?' or a space that would glue to '\\n')."""
    import random

    from denselm.inference import Encoder

    out, enc = st_export(tmp_path, "qwen3", "qwen2", "bge-icl")
    assert enc.spec.query_cut == "token"
    st = load_st(out)
    rng = random.Random(0)
    plain = ["why", "does", "my", "long", "query", "unbelievably", "keep", "going"]
    odd = plain + ["query?", "ünï", "🐍", "x.", "a,", "日本語", "?!", "  "]
    adversarial = ["".join(rng.choice(odd) + rng.choice(["", " "]) for _ in range(rng.randint(n, n + 30)))
                   for n in (5, 30) for _ in range(60)]  # within the limit, at it and beyond it
    tail = enc.tokenizer("x\nResponse:", add_special_tokens=False)["input_ids"][1:] + [enc.tokenizer.eos_token_id]
    st_ids, ours = ids_of(st, adversarial, "query"), enc.query_ids(adversarial)
    assert st_ids == ours
    cut = [a for a in ours if len(a) == 32]
    assert len(cut) >= 60 and all(a[-len(tail):] == tail for a in cut)
    assert cos_rows(st.encode_query(adversarial), enc.encode_queries(adversarial)).min() >= 0.9999

    # A model trained the seed's way (query_cut: retokenize, every model saved before denselm.json v3)
    # keeps that cut in denselm; its export says that long queries can differ next to the suffix.
    enc.model.spec = enc.model.spec.replace(query_cut="retokenize")
    seed_way = Encoder(enc.model)
    retok = seed_way.query_ids(adversarial)
    differ = [i for i, (a, b) in enumerate(zip(retok, ours)) if a != b]
    assert differ and all(len(ours[i]) == 32 for i in differ)  # only cut queries differ
    for i in differ:  # ... and only in the few ids just before the suffix
        keep = min(len(retok[i]), 32) - len(tail) - 3
        assert retok[i][:keep] == ours[i][:keep] and retok[i][-1] == tail[-1]
    folder = tmp_path / "seed-way"
    enc.model.save(folder)
    assert cli_main(["export", "--model", str(folder), "--output", str(tmp_path / "st2"),
                     "--format", "sentence-transformers"]) == 0
    card = (tmp_path / "st2" / "README.md").read_text()
    assert "query_cut: retokenize" in card and "can differ from denselm" in card


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
    # (the instruction lives in the export's chat template and denselm.json; ST's prompts stay empty)
    st = load_st(tmp_path / "o")
    assert ids_of(st, ["apple"], "query") == encoder(tmp_path / "o").query_ids(["apple"])
    assert "Instruct: Find the fruit\nQuery: apple" in st.tokenizer.decode(ids_of(st, ["apple"], "query")[0])
    assert json.loads((tmp_path / "o" / "denselm.json").read_text())["prompt"] == "Find the fruit"
    # a template that needs an instruction, none saved nor given: one line naming the flag, nothing written
    from test_encode import save_tiny_denselm

    no_prompt = save_tiny_denselm(tmp_path / "np", template="qwen3-embedding", prompt=None)
    before = set(tmp_path.iterdir())
    assert cli_main(["export", "--model", str(no_prompt), "--output", str(tmp_path / "o2"),
                     "--format", "sentence-transformers"]) == 2
    assert "pass --instruction" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("fmt", ["merged", "sentence-transformers"])
def test_readme_transformers_snippet_reproduces_denselm(tmp_path, llama_lora, fmt):
    """The model card's plain-transformers code, run as written, gives denselm's vectors (long texts included)."""
    import re

    lora, enc = llama_lora
    out = tmp_path / "out"
    assert cli_main(["export", "--model", str(lora), "--output", str(out), "--format", fmt]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "pipeline_tag: sentence-similarity" in card
    for needed in ("bge-icl", "\\nResponse:", "queries 64, passages 32", "end_aligned", "denselm serve",
                   "vllm serve", "text-embeddings-router", "NOT run", "GGUF"):
        assert needed in card, needed
    snippet = re.search(r"### transformers .*?```python\n(.*?)```", card, re.S).group(1)
    ns: dict = {}
    exec(snippet.replace("PATH", str(out)), ns)
    long_q = [" ".join(["why does my long query keep going?"] * 12), "é" * 200]
    q = ns["embed"]([ns["ids"](ns["QUERY_HEAD"] + t, ns["QUERY_MAX_LEN"], ns["QUERY_SUFFIX"]) for t in QUERIES + long_q])
    d = ns["embed"]([ns["ids"](ns["PASSAGE_PREFIX"] + t, ns["PASSAGE_MAX_LEN"]) for t in PROBE_DOCS])
    assert cos_rows(q.numpy(), enc.encode_queries(QUERIES + long_q)).min() >= 0.9999
    assert cos_rows(d.numpy(), enc.encode_corpus(PROBE_DOCS)).min() >= 0.9999
    if fmt == "sentence-transformers":
        assert "encode_query" in card and ">= 6.3" in card


def write_beir_folder(folder):
    """A small BEIR folder (titles on some documents, non-ASCII, a long passage) with graded qrels."""
    folder.mkdir(parents=True)
    queries = {f"q{i}": q for i, q in enumerate(PROBE_QUERIES)}
    docs = {f"d{i}": (f"Title {i}" if i % 2 else "", t) for i, t in enumerate(PROBE_DOCS + DOCS[::-1] + QUERIES)}
    (folder / "qrels").mkdir()
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items())
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": k, "title": t, "text": v}) + "\n" for k, (t, v) in docs.items())
    qrels = [(q, f"d{(3 * i) % len(docs)}", 1 + i % 2) for i, q in enumerate(queries)]
    qrels += [(q, f"d{(5 * i + 1) % len(docs)}", 1) for i, q in enumerate(queries)]
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return folder


def mteb_task(folder):
    """A local mteb retrieval task over a BEIR folder (no hub): stock AbsTaskRetrieval, data given directly."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    def rows(name):
        return [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]

    qrels: dict = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, g = line.split("\t")
        qrels.setdefault(q, {})[d] = int(g)

    class LocalBeir(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="DenselmLocalBeir", description="a local BEIR folder", reference=None,
            dataset={"path": str(folder), "revision": "local"}, type="Retrieval", category="t2t",
            modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
            date=("2026-01-01", "2026-01-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
            annotations_creators="derived", dialect=[], sample_creation="found", bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": r["_id"], "text": r["text"]} for r in rows("queries.jsonl")]),
                corpus=Dataset.from_list([{"id": r["_id"], "title": r["title"], "text": r["text"]}
                                          for r in rows("corpus.jsonl")]),
                relevant_docs=qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalBeir()


@pytest.mark.parametrize("template", [pytest.param("bge-icl", marks=pytest.mark.slow), "qwen3-embedding"])
def test_mteb_on_st_export_reproduces_denselm_evaluate(tmp_path, template):
    """A stock mteb run on the sentence-transformers export gives denselm evaluate's nDCG@10 (1e-4)."""
    mteb = pytest.importorskip("mteb")
    out, enc = st_export(tmp_path, "qwen3", "qwen2", template)
    beir = write_beir_folder(tmp_path / "beir")
    metrics_path = tmp_path / "metrics.json"
    assert cli_main(["evaluate", "--model", str(out), "--data", str(beir), "--k", "10",
                     "--device", "cpu", "--output", str(metrics_path)]) == 0
    denselm_ndcg = json.loads(metrics_path.read_text())
    denselm_ndcg = denselm_ndcg.get("metrics", denselm_ndcg)["ndcg@10"]
    result = mteb.evaluate(load_st(out), mteb_task(beir), cache=None, show_progress_bar=False)
    mteb_ndcg = result.task_results[0].scores["test"][0]["ndcg_at_10"]
    assert abs(mteb_ndcg - denselm_ndcg) <= 1e-4, (mteb_ndcg, denselm_ndcg)
    assert 0 < denselm_ndcg < 1


@pytest.mark.parametrize("tokenizer_name,arch,template", [("qwen3", "qwen2", "bge-icl"),
                                                          ("smollm2-bos-eos", "llama", "e5-mistral")])
def test_onnx_export_matches_denselm(tmp_path, tokenizer_name, arch, template):
    """onnxruntime on the exported graph (pooling and normalisation inside) gives denselm's vectors for
    batches of 1 and 7 mixed-length rows (dynamic axes), padded on either side; the README's code runs."""
    import re

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from denselm.data.tokenize import pad_batch

    lora, enc = make_lora_model(tmp_path, tokenizer_name, arch, template)
    out = tmp_path / "onnx"
    assert cli_main(["export", "--model", str(lora), "--output", str(out), "--format", "onnx"]) == 0
    assert not list(out.glob("*.safetensors"))  # the graph holds the weights
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    queries, docs = (PROBE_QUERIES + QUERIES)[:7], (PROBE_DOCS + QUERIES)[:7]
    for rows, want in [(enc.query_ids(queries), enc.encode_queries(queries)),
                       (enc.passage_ids(docs), enc.encode_corpus(docs))]:
        assert len(rows) == 7 and len(set(map(len, rows))) > 3  # mixed lengths
        for side in ("left", "right"):
            feats = pad_batch(rows, enc.tokenizer.eos_token_id, side)
            (emb,) = sess.run(None, {k: v.numpy() for k, v in feats.items()})
            assert emb.shape == want.shape and cos_rows(emb, want).min() >= 0.9999
        for i in (0, 6):  # batch of one
            feats = pad_batch(rows[i:i + 1], enc.tokenizer.eos_token_id)
            (emb,) = sess.run(None, {k: v.numpy() for k, v in feats.items()})
            assert cos_rows(emb, want[i:i + 1]).min() >= 0.9999
    card = (out / "README.md").read_text()
    assert "library_name: onnx" in card and "LEFT" in card
    code = re.search(r"### ONNX Runtime.*?```python\n(.*?)```", card, re.S).group(1)
    ns: dict = {}
    exec(code.replace("PATH", str(out)), ns)
    assert cos_rows(ns["q"], enc.encode_queries(["how do I sort a dict by value?"])).min() >= 0.9999


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_export_close_to_fp32(tmp_path, qwen_lora, dtype):
    """--dtype bf16/fp16: half-size weights, stock ST vectors within cosine 0.999 of the fp32 export's."""
    import torch

    lora, enc = qwen_lora
    outs = {}
    for d in ("fp32", dtype):
        outs[d] = tmp_path / d
        assert cli_main(["export", "--model", str(lora), "--output", str(outs[d]), "--format", "sentence-transformers",
                         "--dtype", d]) == 0
    from safetensors import safe_open

    with safe_open(str(outs[dtype] / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert (outs[dtype] / "model.safetensors").stat().st_size < 0.6 * (outs["fp32"] / "model.safetensors").stat().st_size
    assert f"| dtype | {dtype} |" in (outs[dtype] / "README.md").read_text()
    full, half = load_st(outs["fp32"]), load_st(outs[dtype])
    assert half[0].model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for fn in ("encode_query", "encode_document"):
        a = getattr(full, fn)(PROBE_QUERIES + PROBE_DOCS)
        b = getattr(half, fn)(PROBE_QUERIES + PROBE_DOCS)
        assert cos_rows(np.asarray(a, np.float32), np.asarray(b, np.float32)).min() >= 0.999
    with pytest.raises(SystemExit):
        cli_main(["export", "--model", str(lora), "--output", str(tmp_path / "x"), "--dtype", "int8"])


def test_exported_vectors_do_not_depend_on_the_batch(tmp_path, qwen_lora):
    """end_aligned positions shift with the batch's longest text; with rotary embeddings only position
    differences matter, so a text alone and inside a batch of long texts agree to float noise."""
    lora, enc = qwen_lora
    out = tmp_path / "st"
    assert cli_main(["export", "--model", str(lora), "--output", str(out), "--format", "sentence-transformers"]) == 0
    st = load_st(out)
    long_docs = [" ".join(["lorem ipsum dolor sit amet"] * 40)] * 5
    for fn in ("encode_query", "encode_document"):
        alone = np.stack([getattr(st, fn)([t])[0] for t in QUERIES])
        batched = getattr(st, fn)(QUERIES + long_docs, batch_size=8)[: len(QUERIES)]
        assert np.abs(alone - batched).max() <= 1e-5
    alone = np.stack([enc.encode_queries([t])[0] for t in QUERIES])
    assert np.abs(alone - enc.encode_queries(QUERIES + long_docs)[: len(QUERIES)]).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_exports_match_denselm(tmp_path):
    """Real asset: SmolLM2-135M (4 layers, bge-icl, queries 48 / passages 64 tokens as in the demo) exported
    for sentence-transformers and ONNX; pyfaq queries and passages (some cut, some non-ASCII) match denselm."""
    from denselm.assets import AssetMissing
    from denselm.demo import ensure_model
    from denselm.inference import Encoder
    from denselm.model.encoder import BiEncoderModel
    from denselm.spec import PRESETS

    try:
        base = ensure_model(os.environ.get("DENSELM_MODEL_DIR", "~/.cache/denselm/smollm2-135m-instruct"))
    except AssetMissing as err:
        pytest.skip(str(err))
    from transformers import AutoModel, AutoTokenizer

    spec = PRESETS["bge-en-icl"].replace(base_model=str(base), num_layers=4, query_max_len=48, passage_max_len=64,
                                         prompt="Given a question about Python, retrieve the passage that answers it")
    backbone = AutoModel.from_pretrained(base, num_hidden_layers=4)
    model = BiEncoderModel(model=backbone, tokenizer=AutoTokenizer.from_pretrained(base), spec=spec)
    model.save(tmp_path / "model")
    enc = Encoder(model)
    data = "data/pyfaq" if os.path.isdir("data/pyfaq") else os.path.join(os.path.dirname(__file__), "..", "data", "pyfaq")
    rows = [json.loads(line) for line in open(os.path.join(data, "queries.jsonl"))][:40]
    queries = [r["text"] for r in rows] + [" ".join(r["text"] for r in rows[:8]), "Wörterbuch sortieren? 日本語 🐍" * 9]
    docs = [json.loads(line)["text"] for line in open(os.path.join(data, "corpus.jsonl"))][:40]
    for fmt in ("sentence-transformers", "merged"):
        assert cli_main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / fmt),
                         "--format", fmt]) == 0
    size = {f: sum(p.stat().st_size for p in (tmp_path / f).rglob("*") if p.is_file()) for f in ("sentence-transformers", "merged")}
    assert size["sentence-transformers"] <= 1.1 * size["merged"]
    st = load_st(tmp_path / "sentence-transformers")
    assert sum(len(x) == 48 for x in enc.query_ids(queries)) >= 2 and sum(len(x) == 64 for x in enc.passage_ids(docs)) >= 10
    assert cos_rows(st.encode_query(queries), enc.encode_queries(queries)).min() >= 0.9999
    assert cos_rows(st.encode_document(docs), enc.encode_corpus(docs)).min() >= 0.9999


def test_training_metrics_for_the_model_card(tmp_path):
    """The card's metrics: the last record with eval/* keys of the run's log.jsonl, next to the model folder."""
    from denselm.export import training_metrics

    (tmp_path / "model").mkdir()
    assert training_metrics(tmp_path / "model") is None
    lines = [{"step": 5, "loss": 1.0, "eval/ndcg@10": 0.2}, {"step": 8, "loss": 0.5},
             {"step": 10, "loss": 0.4, "eval/ndcg@10": 0.31, "eval/mrr@10": 0.25}, {"step": 12, "loss": 0.3}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "not json\n")
    assert training_metrics(tmp_path / "model") == ({"ndcg@10": 0.31, "mrr@10": 0.25}, "log.jsonl, step 10")
