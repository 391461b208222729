"""denselm.convert: GGUF -> transformers folder, checked on a tiny GGUF written here with the gguf library.

The tiny file mirrors the real SmolLM2 one: llama architecture, a GPT-2 style
byte-level BPE vocabulary with ChatML specials, Q8_0 embeddings, Q4_1 linear
layers and F32 norms, so transformers goes through the same dequantising path.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from denselm import convert  # noqa: E402
from denselm.cli import main as cli_main  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path, seed: int = 0):
    """A 2-layer llama GGUF with random weights; returns the float arrays written (before quantising)."""
    rng = np.random.default_rng(seed)
    merges = ["h e", "l l", "Ġ w"]
    tokens = SPECIALS + _byte_tokens() + ["he", "ll", "Ġw"]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    written = {}

    def add(name, shape, qtype=None, scale=0.05):
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("norm.weight"):
            data = 1.0 + data
        written[name] = data
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    q81, q41 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    add("token_embd.weight", (vocab, HIDDEN), q81)  # tied with the output layer, as in SmolLM2
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), q41)
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN), q41)
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN), q41)
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), q41)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), q41)
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), q41)
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), q41)
    add("output_norm.weight", (HIDDEN,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, converted folder, arrays written) — converted once for the module."""
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.Q4_1.gguf"
    written = write_tiny_gguf(path)
    out = convert.convert_gguf(path, root / "converted")
    return path, out, written


def test_folder_is_a_plain_transformers_model(tiny):
    path, out, _ = tiny
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", convert.PROVENANCE_FILE} <= names
    assert not any(n.startswith(".") for n in os.listdir(out.parent))  # no temp folder left behind
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (LAYERS, HIDDEN, KV_HEADS)
    provenance = json.loads((out / convert.PROVENANCE_FILE).read_text())
    assert provenance["source"] == path.name and provenance["dtype"] == "float32"


def test_converted_logits_equal_gguf_logits(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out, _ = tiny
    gguf_model, gguf_tok = convert.load_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "hello world<|im_end|>"
    ids = gguf_tok(text, return_tensors="pt")["input_ids"]
    assert tok(text)["input_ids"] == ids[0].tolist()
    # byte-level BPE with our 3 merges: "he" "ll" "o" "Ġw" "o" "r" "l" "d" then EOS (id 2)
    assert len(ids[0]) == 9 and ids[0, -1].item() == 2
    with torch.no_grad():
        expected = gguf_model.eval()(ids).logits
        got = model(ids).logits
    assert got.shape == (1, 9, len(SPECIALS) + 256 + 3)
    assert torch.equal(got, expected)


def test_weights_are_the_dequantised_gguf_tensors(tiny):
    """Cross-check against gguf's own reader, independent of transformers' loader."""
    from safetensors.torch import load_file

    path, out, written = tiny
    state = load_file(out / "model.safetensors")
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    emb = by_name["token_embd.weight"]
    dequant = gguf.quants.dequantize(emb.data, emb.tensor_type).reshape(written["token_embd.weight"].shape)
    assert torch.equal(state["model.embed_tokens.weight"], torch.from_numpy(dequant))
    # Q8_0 is close to the floats we wrote (error <= half a step of 1/127 of each block's max)
    assert np.abs(dequant - written["token_embd.weight"]).max() < 0.01
    down = by_name["blk.1.ffn_down.weight"]
    dequant = gguf.quants.dequantize(down.data, down.tensor_type).reshape(HIDDEN, FFN)
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(dequant))
    assert torch.equal(state["model.norm.weight"], torch.from_numpy(written["output_norm.weight"]))


def test_existing_output_needs_overwrite(tiny, tmp_path):
    path, _, _ = tiny
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.convert_gguf(path, out)
    convert.convert_gguf(path, out, dtype="bfloat16", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["m"]  # neither the temp nor the old folder remains
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_cli(tiny, tmp_path, capsys):
    path, _, _ = tiny
    out = tmp_path / "cli-out"
    assert cli_main(["convert-gguf", "--gguf", str(path), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert cli_main(["convert-gguf", "--gguf", str(path), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert-gguf", "--gguf", str(tmp_path / "nope.gguf"), "--output", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_dtype(tiny, tmp_path):
    with pytest.raises(ValueError, match="--dtype"):
        convert.convert_gguf(tiny[0], tmp_path / "x", dtype="int8")


@pytest.mark.slow
def test_real_smollm2(tmp_path, monkeypatch):
    """The packaged SmolLM2-135M-Instruct (about 45 s on one CPU thread): logits survive conversion."""
    from transformers import AutoModelForCausalLM

    from denselm.assets import AssetMissing, smollm2_gguf

    try:
        path = smollm2_gguf()
    except AssetMissing as err:
        pytest.skip(str(err))
    gguf_model, tok = convert.load_gguf(path)
    ids = tok("How do I sort a list in Python?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = gguf_model.eval()(ids).logits
    # dequantising the file takes most of the time: let the conversion reuse this load
    monkeypatch.setattr(convert, "load_gguf", lambda _: (gguf_model, tok))
    out = convert.convert_gguf(path, tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
