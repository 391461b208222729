"""The embedding spec: one frozen dataclass, built from the config, saved as denselm.json (versioned),
read back by the model, the encoder and export; today's folders (version 1) still encode the same."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_tokenizer
from denselm import BiEncoderModel
from denselm.cli import main as cli_main
from denselm.config import Config, ModelConfig, build
from denselm.data.config import DataConfig
from denselm.errors import UserError
from denselm.inference import Encoder, load_encoder
from denselm.spec import (DEFAULT_SPEC, MANIFEST_NAME, PLAIN, SPEC_VERSION, BaseModelNotFound, EmbeddingSpec,
                          manifest_dict, parse_manifest, read_manifest, record_base_model, spec_from_config)
from tiny_models import tiny_backbone

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def _spec(**kw) -> EmbeddingSpec:
    return EmbeddingSpec(template="qwen3-embedding", prompt="Find it", passage_prefix="p: ", query_max_len=40,
                         passage_max_len=50, pooling="mean", normalized=False, added_tokens=("<x>",), num_layers=2, **kw)


def test_round_trip_through_the_manifest_dict(tmp_path):
    spec = _spec(base_model="org/name")
    values = json.loads(json.dumps(manifest_dict(spec, tmp_path, temperature=0.05, adapter=True)))
    assert values["version"] == SPEC_VERSION and values["format"] == "denselm"
    m = parse_manifest(values)
    assert m.spec == spec and m.adapter and m.temperature == 0.05 and m.version == SPEC_VERSION


def test_spec_is_frozen_and_packing_implies_from_zero():
    spec = EmbeddingSpec(packing=True)
    assert spec.position_ids == "from_zero"
    with pytest.raises(Exception):
        spec.template = "none"
    with pytest.raises(UserError, match="pooling"):
        EmbeddingSpec(pooling="max")


def test_model_save_load_round_trip_keeps_the_spec(tmp_path):
    spec = _spec(base_model=None).replace(added_tokens=(), num_layers=None)
    model = BiEncoderModel(model=tiny_backbone("llama", vocab_size=400), tokenizer=make_tokenizer(), spec=spec,
                           temperature=0.05).eval()
    out = model.save(tmp_path / "m")
    m = read_manifest(out)
    assert m.version == SPEC_VERSION and m.temperature == 1.0  # not normalised: reset to 1.0 (the seed's rule)
    loaded = BiEncoderModel.load(out)
    assert loaded.spec.replace(base_model=None) == spec  # base_model: the folder it was built from
    texts = ["a b c", "hello there"]
    np.testing.assert_allclose(Encoder(loaded).encode_corpus(texts), Encoder(model).encode_corpus(texts), atol=1e-6)


def test_unknown_future_version_names_both_versions(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": "denselm", "version": SPEC_VERSION + 1}))
    with pytest.raises(UserError, match=f"version {SPEC_VERSION + 1}.*up to {SPEC_VERSION}"):
        read_manifest(folder)
    with pytest.raises(UserError, match="newer denselm"):
        BiEncoderModel.load(folder)


def test_legacy_folder_loads_and_encodes_to_the_same_vectors(tmp_path):
    """tests/fixtures/legacy_v1 was saved by the code before the spec (see its make_fixture.py)."""
    texts = json.loads((LEGACY / "texts.json").read_text())
    m = read_manifest(LEGACY / "model")
    assert m.version == 1 and m.temperature == 0.05
    assert m.spec.template == "bge-icl-special" and m.spec.added_tokens == ("<instruct>", "<query>", "<response>")
    assert (m.spec.query_max_len, m.spec.passage_max_len, m.spec.passage_prefix) == (24, 20, "passage: ")
    enc = load_encoder(LEGACY / "model", device="cpu", show_progress=False)
    q, p = enc.encode_queries(texts["queries"]), enc.encode_corpus(texts["passages"])
    np.testing.assert_allclose(q, np.load(LEGACY / "queries.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(p, np.load(LEGACY / "passages.npy"), atol=1e-6, rtol=0)
    # Saved again it is the current version (query_cut recorded) and still the same vectors.
    out = enc.model.save(tmp_path / "v2")
    assert read_manifest(out).version == SPEC_VERSION
    again = load_encoder(out, device="cpu", show_progress=False)
    assert again.spec == enc.spec
    np.testing.assert_allclose(again.encode_queries(texts["queries"]), q, atol=1e-6, rtol=0)


def test_legacy_keys_it_lacks_mean_the_plain_preset():
    # Versions before 3 cut long suffix-template queries the seed's way: they load with that cut.
    legacy = PLAIN.replace(query_cut="retokenize")
    m = parse_manifest({"format": "denselm", "version": 1, "pooling": "last", "normalized": True})
    assert m.spec == legacy
    m = parse_manifest({"pooling": "mean", "normalized": False, "query_max_len": 64})  # no version at all
    assert m.version == 1 and m.spec == legacy.replace(pooling="mean", normalized=False, query_max_len=64)
    m = parse_manifest({"format": "denselm", "version": 2, "template": "bge-icl", "prompt": "p"})
    assert m.spec.query_cut == "retokenize"
    m = parse_manifest({"format": "denselm", "version": 3, "template": "bge-icl", "prompt": "p"})
    assert m.spec.query_cut == "token" == PLAIN.query_cut
    with pytest.raises(UserError, match="query_cut"):
        parse_manifest({"format": "denselm", "version": 3, "query_cut": "chars"})


def test_spec_from_config(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    cfg = build(Config, {
        "model": {"name_or_path": str(base), "pooling": "mean", "normalized": False, "num_layers": 3, "packing": True},
        "data": {"template": "e5-mistral", "prompt": None, "query_max_len": 30, "passage_max_len": 90,
                 "passage_prefix": "passage: "},
        "eval": {"query_instruction": "Find the fruit"},
    })
    spec = spec_from_config(cfg, ["<a>"])
    assert spec == EmbeddingSpec(base_model=str(base.resolve()), num_layers=3, added_tokens=("<a>",),
                                 template="e5-mistral", prompt="Find the fruit", passage_prefix="passage: ",
                                 query_max_len=30, passage_max_len=90, pooling="mean", normalized=False,
                                 position_ids="from_zero", packing=True)
    cfg.data.prompt = "Global"
    assert spec_from_config(cfg).prompt == "Global"
    assert spec_from_config(build(Config, {"model": {"name_or_path": "org/model"}})).base_model == "org/model"


def test_defaults_live_in_the_spec():
    """The config's defaults are the spec's: a config with nothing set builds the default spec."""
    assert spec_from_config(build(Config, {})) == DEFAULT_SPEC
    model, data = ModelConfig(), DataConfig()
    for name in ("pooling", "normalized", "position_ids", "packing", "num_layers"):
        assert getattr(model, name) == getattr(DEFAULT_SPEC, name)
    for name in ("template", "prompt", "passage_prefix", "query_max_len", "passage_max_len"):
        assert getattr(data, name) == getattr(DEFAULT_SPEC, name)
    # A bare model (the seed's arguments) has no text format: the plain preset, not normalised (seed).
    bare = BiEncoderModel(model=tiny_backbone("llama"))
    assert bare.spec == PLAIN.replace(normalized=False)
    assert Encoder(bare, tokenizer=make_tokenizer()).spec == bare.spec


def test_one_constructor_path_model_for_save_keeps_everything():
    from types import SimpleNamespace

    from denselm import parallel
    from denselm.train import model_for_save

    model = BiEncoderModel(model=tiny_backbone("llama"), spec=_spec(), temperature=0.5, sub_batch_size=3,
                           manifest={"custom_key": 1})
    view = model.with_backbone(model.model)
    assert view.spec == model.spec and view.loss_settings() == model.loss_settings()
    assert view.manifest == model.manifest and view.manifest["custom_key"] == 1
    assert model_for_save(model, parallel.Single()) is model
    inner = tiny_backbone("llama")  # a wrapper whose unwrap gives another module: a view with the same spec
    saved = model_for_save(model, SimpleNamespace(unwrap=lambda m: inner))
    assert saved.model is inner and saved.spec == model.spec and saved.temperature == model.temperature
    assert not saved.negatives_cross_device


def test_legacy_manifest_kwarg_and_attributes_still_work():
    model = BiEncoderModel(model=tiny_backbone("llama"), normalized=True, packing=True,
                           manifest={"template": "bge-icl", "prompt": "p", "query_max_len": 33})
    assert model.manifest["template"] == "bge-icl" and model.spec.query_max_len == 33
    assert (model.normalized, model.pooling, model.packing, model.position_policy) == (True, "last", True, "from_zero")
    enc = Encoder(model, tokenizer=make_tokenizer(), passage_max_len=70)
    assert (enc.template, enc.prompt, enc.query_max_len, enc.passage_max_len) == ("bge-icl", "p", 33, 70)


# ------------------------------------------------------------------ base model of a LoRA adapter
def test_record_base_model(tmp_path):
    folder = tmp_path / "model"
    inside, outside = folder / "base", tmp_path / "other"
    snapshot = tmp_path / "hub" / "models--Org--Name-1B" / "snapshots" / "abc123"
    for p in (inside, outside, snapshot):
        p.mkdir(parents=True)
    assert record_base_model(str(inside), folder) == "base"
    assert record_base_model(str(outside), folder) == str(outside.resolve())
    assert record_base_model(str(snapshot), folder) == "Org/Name-1B"
    assert record_base_model("Qwen/Qwen3-0.6B", folder) == "Qwen/Qwen3-0.6B"
    assert record_base_model(None, folder) is None


def _adapter(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base_dir = tmp_path / "base"
    tiny_backbone("qwen2", vocab_size=400).save_pretrained(base_dir)
    lora = get_peft_model(AutoModel.from_pretrained(base_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model = BiEncoderModel(model=lora, tokenizer=make_tokenizer(), spec=PLAIN).eval()
    return model, model.save(tmp_path / "adapter"), base_dir


def test_missing_base_model_names_the_flag_and_the_recorded_value(tmp_path, capsys):
    model, out, base_dir = _adapter(tmp_path)
    texts = ["one two", "three"]
    ref = Encoder(model).encode_corpus(texts)
    moved = shutil.move(str(base_dir), str(tmp_path / "moved"))
    with pytest.raises(BaseModelNotFound) as err:
        BiEncoderModel.load(out)
    assert "--base-model" in str(err.value) and str(base_dir.resolve()) in str(err.value)
    with pytest.raises(BaseModelNotFound, match="--base-model"):
        BiEncoderModel.load(out, base_model=str(tmp_path / "nowhere"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": "one two"}) + "\n")
    capsys.readouterr()
    assert cli_main(["encode", "--dtype", "float32", "--model", str(out), "--input", str(corpus), "--output", str(tmp_path / "e"),
                     "--device", "cpu"]) != 0  # one line, no traceback
    assert "--base-model" in capsys.readouterr().err
    np.testing.assert_allclose(Encoder(BiEncoderModel.load(out, base_model=moved)).encode_corpus(texts), ref, atol=1e-5)


def test_base_inside_the_model_folder_is_recorded_relative_and_travels(tmp_path):
    model, out, base_dir = _adapter(tmp_path)
    texts = ["one two", "three"]
    ref = Encoder(model).encode_corpus(texts)
    shutil.move(str(base_dir), str(out / "base"))
    # Loaded with the base inside, then saved elsewhere with it inside again: recorded as "base".
    loaded = BiEncoderModel.load(out, base_model=str(out / "base"))
    values = json.loads((out / MANIFEST_NAME).read_text())
    values["base_model"] = record_base_model(str(out / "base"), out)
    assert values["base_model"] == "base"
    (out / MANIFEST_NAME).write_text(json.dumps(values))
    (tmp_path / "elsewhere").mkdir()
    travelled = shutil.move(str(out), str(tmp_path / "elsewhere" / "adapter"))  # the whole folder moves
    np.testing.assert_allclose(Encoder(BiEncoderModel.load(travelled)).encode_corpus(texts), ref, atol=1e-5)
    np.testing.assert_allclose(Encoder(loaded).encode_corpus(texts), ref, atol=1e-5)


# ------------------------------------------------------------------ CLI
def test_info_prints_the_resolved_spec(capsys, tmp_path):
    assert cli_main(["info", str(LEGACY / "model")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 1 and info["spec"]["template"] == "bge-icl-special"
    assert info["spec"]["query_max_len"] == 24 and info["training_only"] == {"temperature": 0.05}
    assert cli_main(["info", str(tmp_path), "--preset", "qwen3-embedding"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["template"] == "qwen3-embedding"
    assert cli_main(["info", str(tmp_path)]) == 2
    assert "--preset" in capsys.readouterr().err
