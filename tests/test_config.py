"""denselm.config: YAML + dotted overrides -> a typed, validated Config; every error names the key."""

from __future__ import annotations

import pytest

from denselm.config import Config, build, load_config, parse_overrides
from denselm.errors import ConfigError


def test_overrides_parse_yaml_values_and_nest():
    out = parse_overrides(["--train.lr", "2e-4",  # YAML 1.1 reads 2e-4 as a string; build() converts it
                           "--model.lora.r=8", "--data.prompt", "None",
                           "--data.train_data", "[a, b]", "--eval.data", "null"])
    assert out == {"train": {"lr": "2e-4"}, "model": {"lora": {"r": 8}},
                   "data": {"prompt": None, "train_data": ["a", "b"]}, "eval": {"data": None}}
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="overrides look like --section.key value"):
        parse_overrides(["train.lr", "1"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  max_steps: 5\nmodel:\n  lora:\n    r: 8\n")
    cfg = load_config(path, ["--train.max_steps", "7", "--model.lora.alpha", "4"])
    assert isinstance(cfg, Config)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.model.lora.r, cfg.model.lora.alpha) == (0.001, 7, 8, 4)
    assert cfg.train.keep_last == 2  # defaults kept


def test_types_are_checked_naming_the_key():
    with pytest.raises(ConfigError, match="train.max_steps must be an integer, got 'ten'"):
        build(Config, {"train": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match="model.normalized must be true or false"):
        build(Config, {"model": {"normalized": "yes"}})
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        build(Config, {"train": {"lr": [1]}})
    assert build(Config, {"train": {"lr": "3e-4"}}).train.lr == 3e-4  # YAML reads 3e-4 as a string


@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "train.warmup_fraction", "train.max_grad_norm",
                                 "model.temperature", "model.lora.dropout", "loss.teacher_temperature",
                                 "loss.distill_weight", "train.cache_max_gb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_rejects_nan_and_inf(key, value):
    section, *rest = key.split(".")
    values: dict = {}
    node = values.setdefault(section, {})
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        build(Config, values)


def test_unknown_keys_suggest_close_names():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean train.lr\?\)"):
        build(Config, {"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"'model.lora.rank'"):
        build(Config, {"model": {"lora": {"rank": 4}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' \(did you mean train\?\)"):
        build(Config, {"trian": {}})
    with pytest.raises(ConfigError, match="unknown config key 'train.fail_at_step'"):  # the old fault field is gone
        build(Config, {"train": {"fail_at_step": 3}})


def test_sections_must_be_mappings(tmp_path):
    path = tmp_path / "c.yaml"
    for text, key in (("train: 5\n", "train"), ("eval: [1, 2]\n", "eval"), ("model:\n  lora: x\n", "model.lora")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{key} must be a mapping"):
            load_config(path)
        override = "--model.lora.r" if key == "model.lora" else f"--{key}.every" if key == "eval" else "--train.lr"
        with pytest.raises(ConfigError, match=f"{key} must be a mapping"):
            load_config(path, [override, "1"])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_eval_metric_is_validated_at_load():
    assert build(Config, {"eval": {"metric": "recall@100"}}).eval.metric == "recall@100"
    with pytest.raises(ConfigError, match=r"got 'ndgc@10' \(did you mean ndcg@10\?\)"):
        build(Config, {"eval": {"metric": "ndgc@10"}})
    with pytest.raises(ConfigError, match="eval.every must be >= 0"):
        build(Config, {"eval": {"every": -1}})


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
