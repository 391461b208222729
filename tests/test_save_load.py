"""save() writes safetensors + manifest atomically; load() gives the same embeddings."""

import json

import pytest
import torch

from denselm import BiEncoderModel
from equivalence import rel_err
from tiny_models import random_batch, tiny_backbone


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_full_model_round_trip(tmp_path):
    backbone = tiny_backbone("llama")
    model = BiEncoderModel(model=backbone, tokenizer=_tokenizer(tmp_path), normalized=True, temperature=0.02,
                           manifest={"query_max_len": 64, "template": "bge-icl"}).eval()
    out = model.save(tmp_path / "out")
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "denselm.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    manifest = json.loads((out / "denselm.json").read_text())
    assert manifest["pooling"] == "last" and manifest["normalized"] and manifest["temperature"] == 0.02
    assert manifest["eos_policy"]["eos_token_id"] == 2 and manifest["query_max_len"] == 64
    loaded = BiEncoderModel.load(out)
    feats, _ = random_batch(4, 3, 9, seed=1)
    with torch.no_grad():
        assert rel_err(loaded.encode(feats), model.encode(feats)) < 1e-6
    assert loaded.temperature == 0.02 and loaded.manifest["template"] == "bge-icl"


def test_lora_adapter_round_trip_and_merge(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    tiny_backbone("qwen2").save_pretrained(base_dir)
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(base_dir)
    lora = get_peft_model(backbone, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model = BiEncoderModel(model=lora, tokenizer=_tokenizer(tmp_path), normalized=True).eval()
    out = model.save(tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").exists()
    manifest = json.loads((out / "denselm.json").read_text())
    assert manifest["adapter"] and manifest["base_model"] == str(base_dir.resolve())
    merged_dir = model.save(tmp_path / "merged", merge_lora=True)
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    feats, _ = random_batch(4, 3, 9, seed=2)
    with torch.no_grad():
        ref = model.encode(feats)
        assert rel_err(BiEncoderModel.load(out).encode(feats), ref) < 1e-5
        assert rel_err(BiEncoderModel.load(merged_dir).encode(feats), ref) < 1e-5


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = BiEncoderModel(model=tiny_backbone("llama"), tokenizer=_tokenizer(tmp_path), normalized=True)
    good = model.save(tmp_path / "ckpt")
    before = sorted(p.name for p in good.iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model.model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in good.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_load_rejects_folder_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a denselm model folder"):
        BiEncoderModel.load(tmp_path)


def test_adapter_on_truncated_backbone_reloads_truncated(tmp_path):
    """A model trained on the first N layers (model.num_layers) reloads with N layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from denselm.model.backbone import decoder_layers, truncate_layers

    base_dir = tmp_path / "base"
    tiny_backbone("llama", layers=3).save_pretrained(base_dir)
    backbone = truncate_layers(AutoModel.from_pretrained(base_dir), 2)
    lora = get_peft_model(backbone, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model = BiEncoderModel(model=lora, tokenizer=_tokenizer(tmp_path), normalized=True, manifest={"num_layers": 2}).eval()
    out = model.save(tmp_path / "adapter")
    loaded = BiEncoderModel.load(out)
    assert len(decoder_layers(loaded.model)) == 2
    feats, _ = random_batch(3, 3, 9, seed=4)
    with torch.no_grad():
        assert rel_err(loaded.encode(feats), model.encode(feats)) < 1e-5
