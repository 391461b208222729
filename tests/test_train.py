"""`denselm train` end to end on tiny models: files, parameters, logs, resume, invariants, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_helpers import numbered_rows, write_jsonl
from tiny_models import make_model_dir

from denselm.cli import main as cli_main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def write_config(tmp_path: Path, model_dir: Path, **sections) -> Path:
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", numbered_rows("apple", 24, num_neg=5))
    write_jsonl(data / "b.jsonl", numbered_rows("pear", 16, num_neg=5, pos_scores=[1.0],
                                                neg_scores=[0.5, 0.4, 0.3, 0.2, 0.1]))
    cfg = {
        "model": {"name_or_path": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "data": {"train_data": [str(data)], "group_size": 4, "query_max_len": 24, "passage_max_len": 24,
                 "prompt": "Given a fruit, retrieve its passage", "num_workers": 0},
        "loss": {"teacher_temperature": 0.5},
        "train": {"output_dir": str(tmp_path / "out"), "per_device_batch_size": 4, "lr": 1e-3, "max_steps": 4,
                  "save_every": 2, "tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_cli_end_to_end(tmp_path, model_dir):
    from denselm.config import load_config
    from denselm.train import build_model, build_tokenizer

    cfg_path = write_config(tmp_path, model_dir)
    assert cli_main(["train", str(cfg_path)]) == 0
    out = tmp_path / "out"
    files = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "denselm.json", "tokenizer.json"} <= files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    ck = out / "checkpoints" / "step-0000004"
    assert {p.name for p in ck.iterdir()} == {"trainable.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml"}
    log = read_log(out)
    assert sorted(log) == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in log.values())
    assert any("distillation" in r for r in log.values())  # the "pear" file carries teacher scores
    # every trainable parameter moved away from its initial value
    cfg = load_config(cfg_path)
    torch.manual_seed(cfg.train.seed)
    tok, added = build_tokenizer(cfg)
    initial = {n: p.detach().clone() for n, p in build_model(cfg, tok, added).model.named_parameters() if p.requires_grad}
    trained = load_file(ck / "trainable.safetensors")
    assert set(trained) == set(initial)
    unchanged = [n for n in initial if torch.equal(initial[n], trained[n])]
    assert unchanged == []
    # the final folder loads for encoding
    from denselm.inference import load_encoder

    enc = load_encoder(out / "model", device="cpu", show_progress=False)
    emb = enc.encode_queries(["apple q1", "pear q2"])
    assert emb.shape == (2, 64) and abs(float((emb ** 2).sum(1)[0]) - 1) < 1e-5
    # a second run into the finished folder is refused
    assert cli_main(["train", str(cfg_path)]) == 2


def _run_cli(args, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "denselm.cli", *args], env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.mark.timeout(300)
def test_kill_and_resume_logs_identical_losses(tmp_path, model_dir, record_property):
    steps = {"max_steps": 6, "save_every": 2}
    ref_cfg = write_config(tmp_path / "ref", model_dir, train={**steps, "output_dir": str(tmp_path / "ref_out")})
    _run_cli(["train", str(ref_cfg)])
    cfg = write_config(tmp_path / "crash", model_dir, train={**steps, "output_dir": str(tmp_path / "crash_out")})
    killed = _run_cli(["train", str(cfg)], env_extra={"DENSELM_FAULT": "train.step:kill@3"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "crash_out"
    assert not (out / "model").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-0000002"]
    _run_cli(["train", str(cfg), "--resume"])
    ref, resumed = read_log(tmp_path / "ref_out"), read_log(out)
    assert sorted(resumed) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    loss_diff = max(abs(resumed[s]["loss"] - ref[s]["loss"]) for s in range(1, 7))
    a = load_file(out / "checkpoints" / "step-0000006" / "trainable.safetensors")
    b = load_file(tmp_path / "ref_out" / "checkpoints" / "step-0000006" / "trainable.safetensors")
    weight_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    record_property("resume_max_loss_diff", loss_diff)
    record_property("resume_max_weight_diff", weight_diff)
    assert loss_diff <= 1e-6 and weight_diff <= 1e-6


def _final_trainable(tmp_path, model_dir, name, **sections):
    cfg = write_config(tmp_path / name, model_dir, **sections)
    assert cli_main(["train", str(cfg)]) == 0
    return load_file(tmp_path / name / "out" / "checkpoints" / "step-0000002" / "trainable.safetensors")


def _max_rel(a, b):
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return num / den


@pytest.fixture(scope="module")
def model_dir64(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny64") / "llama", dtype=torch.float64)


def test_custom_mode_accumulation_equals_big_batch(tmp_path, model_dir64, record_property):
    """Own-group loss: batch 8 x accumulation 1 == batch 4 x accumulation 2 (float64)."""
    common = dict(model={"name_or_path": str(model_dir64), "dtype": "float64", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                  data={"dataset_modes": {"a.jsonl": "custom", "b.jsonl": "custom"}, "group_size": 4,
                        "query_max_len": 24, "passage_max_len": 24, "prompt": "p", "num_workers": 0,
                        "train_data": [str(tmp_path / "data_shared")]})
    write_jsonl(tmp_path / "data_shared" / "a.jsonl", numbered_rows("apple", 16, num_neg=5))
    write_jsonl(tmp_path / "data_shared" / "b.jsonl", numbered_rows("pear", 16, num_neg=5))
    big = _final_trainable(tmp_path, model_dir64, "big", **common,
                           train={"per_device_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 2, "save_every": 2,
                                  "output_dir": str(tmp_path / "big" / "out"), "tensorboard": False, "max_grad_norm": None})
    small = _final_trainable(tmp_path, model_dir64, "small", **common,
                             train={"per_device_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "save_every": 2,
                                    "output_dir": str(tmp_path / "small" / "out"), "tensorboard": False, "max_grad_norm": None})
    record_property("accumulation_rel_err", _max_rel(small, big))
    assert _max_rel(small, big) <= 1e-10


def test_grad_cache_on_and_off_give_the_same_update(tmp_path, model_dir64, record_property):
    # Dropout off: chunks draw their masks per chunk, a full batch draws one mask (the replay of
    # each chunk's own masks is tested in test_encoder.py::test_grad_cache_replays_dropout).
    common = dict(model={"name_or_path": str(model_dir64), "dtype": "float64", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    train = {"max_steps": 2, "save_every": 2, "tensorboard": False}
    plain = _final_trainable(tmp_path, model_dir64, "plain", **common,
                             train={**train, "output_dir": str(tmp_path / "plain" / "out")})
    cached = _final_trainable(tmp_path, model_dir64, "cached", **common,
                              loss={"grad_cache": True, "grad_cache_chunk_size": 3, "teacher_temperature": 0.5},
                              train={**train, "output_dir": str(tmp_path / "cached" / "out")})
    record_property("grad_cache_update_rel_err", _max_rel(cached, plain))
    assert _max_rel(cached, plain) <= 1e-10


def test_frozen_layer_cache_gives_the_same_training(tmp_path, model_dir64, record_property):
    """train.cache_frozen_layers: 12 steps (past one epoch, so cached texts are read back)
    update the adapters exactly as the whole model does."""
    common = dict(model={"name_or_path": str(model_dir64), "dtype": "float64", "position_ids": "from_zero",
                         "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": 1}})
    train = {"max_steps": 12, "save_every": 12, "tensorboard": False}

    def final(name, **extra):
        cfg = write_config(tmp_path / name, model_dir64, **common, train={**train, **extra,
                                                                          "output_dir": str(tmp_path / name / "out")})
        assert cli_main(["train", str(cfg)]) == 0
        out = tmp_path / name / "out"
        return load_file(out / "checkpoints" / "step-0000012" / "trainable.safetensors"), read_log(out)

    plain, plain_log = final("plain")
    cached, cached_log = final("cached", cache_frozen_layers=True)
    record_property("frozen_cache_update_rel_err", _max_rel(cached, plain))
    assert _max_rel(cached, plain) <= 1e-10
    assert all(abs(cached_log[s]["loss"] - plain_log[s]["loss"]) <= 1e-10 for s in plain_log)
    assert cached_log[12]["prefix_cache_hit_rate"] > 0.1  # the second epoch reads the cache
    assert "prefix_cache_hit_rate" not in plain_log[12]


@pytest.mark.parametrize(
    "override,message",
    [
        (["--train.lrr", "1"], "unknown config key 'train.lrr'"),
        (["--train.cache_frozen_layers", "true"], "train.cache_frozen_layers needs model.lora.top_layers"),
        (["--train.cache_frozen_layers", "true", "--model.lora.top_layers", "1", "--model.position_ids", "end_aligned"],
         "train.cache_frozen_layers needs model.position_ids: from_zero"),
        (["--train.lr", "abc"], "train.lr must be a number"),
        (["--train.warmup_fraction", "2"], "train.warmup_fraction must be between 0 and 1"),
        (["--model.name_or_path", "/nonexistent/model"], "/nonexistent/model"),
        (["--data.train_data", "/nonexistent/data.jsonl"], "data.train_data: /nonexistent/data.jsonl does not exist"),
        (["--data.group_size", "0"], "data.group_size must be an integer >= 1"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, model_dir, capsys, override, message):
    cfg = write_config(tmp_path, model_dir)
    assert cli_main(["train", str(cfg), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "out" / "model").exists()


def test_bad_data_line_names_file_and_line(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir)
    with open(tmp_path / "data" / "a.jsonl", "a") as f:
        f.write('{"query": "x", "pos": [], "neg": ["y"]}\n')
    assert cli_main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "a.jsonl:25" in err and "pos" in err
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, model_dir, monkeypatch, caplog):
    from denselm.model.encoder import BiEncoderModel

    original = BiEncoderModel.compute_loss
    calls = {"n": 0}

    def sometimes_nan(self, *a, **k):
        loss, scores, metrics = original(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), scores, metrics

    monkeypatch.setattr(BiEncoderModel, "compute_loss", sometimes_nan)
    cfg = write_config(tmp_path, model_dir)
    assert cli_main(["train", str(cfg)]) == 3
    assert "loss is nan at step 3" in caplog.text
    out = tmp_path / "out"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert (out / "checkpoints" / "step-0000002" / "trainer_state.json").exists()
    assert not (out / "model").exists()


def _fruit_beir(folder: Path, n: int = 24) -> Path:
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"apple p{i}"}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"q{i}", "text": f"apple q{i}"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)))
    return folder


def test_evaluation_during_training_keeps_best(tmp_path, model_dir):
    beir = _fruit_beir(tmp_path / "beir")
    cfg = write_config(tmp_path, model_dir, eval={"data": str(beir), "every": 2, "metric": "mrr@10"})
    assert cli_main(["train", str(cfg)]) == 0
    log = read_log(tmp_path / "out")
    assert "eval/mrr@10" in log[2] and "eval/ndcg@10" in log[4] and "eval/mrr@10" not in log[1]
    best_step = max((2, 4), key=lambda s: log[s]["eval/mrr@10"])
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["best"]["step"] == best_step
    assert (tmp_path / "out" / "best" / "denselm.json").exists()
    # the best checkpoint survives pruning (keep_last=1)
    cfg2 = write_config(tmp_path / "k", model_dir, eval={"data": str(beir), "every": 1, "metric": "mrr@10"},
                        train={"keep_last": 1, "save_every": 1, "output_dir": str(tmp_path / "k" / "out")})
    assert cli_main(["train", str(cfg2)]) == 0
    state = json.loads((tmp_path / "k" / "out" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    kept = sorted(p.name for p in (tmp_path / "k" / "out" / "checkpoints").iterdir())
    assert f"step-{state['best']['step']:07d}" in kept and "step-0000004" in kept and len(kept) <= 2


def test_wall_clock_limit_stops_training_and_still_evaluates(tmp_path, model_dir, caplog):
    """train.max_minutes: a step that ends past the budget is the last one (evaluated, checkpointed, saved)."""
    import logging

    beir = _fruit_beir(tmp_path / "beir")
    cfg = write_config(tmp_path, model_dir, eval={"data": str(beir), "every": 0, "metric": "mrr@10"},
                       train={"max_minutes": 1e-6})
    with caplog.at_level(logging.INFO, logger="denselm"):
        assert cli_main(["train", str(cfg)]) == 0
    log = read_log(tmp_path / "out")
    assert sorted(log) == [1] and "eval/mrr@10" in log[1]  # stopped after step 1 of 4, evaluated there
    assert (tmp_path / "out" / "model" / "denselm.json").exists()
    assert (tmp_path / "out" / "checkpoints" / "step-0000001").is_dir()
    assert "train.max_minutes=1e-06 reached after step 1 of 4" in caplog.text
    # a generous budget changes nothing; a bad one is a one-line config error naming the key
    cfg = write_config(tmp_path / "b", model_dir, train={"max_minutes": 60, "output_dir": str(tmp_path / "b" / "out")})
    assert cli_main(["train", str(cfg)]) == 0 and sorted(read_log(tmp_path / "b" / "out")) == [1, 2, 3, 4]
    assert cli_main(["train", str(cfg), "--overwrite", "--train.max_minutes", "0"]) == 2


def test_bf16_autocast_keeps_trainables_and_optimizer_fp32(tmp_path, model_dir):
    """bf16 frozen weights + bf16 autocast: LoRA weights and AdamW state stay float32, loss finite."""
    cfg = write_config(tmp_path, model_dir, model={"name_or_path": str(model_dir), "dtype": "bfloat16",
                                                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                       train={"precision": "bf16", "max_steps": 2, "save_every": 2})
    assert cli_main(["train", str(cfg)]) == 0
    ck = tmp_path / "out" / "checkpoints" / "step-0000002"
    trained = load_file(ck / "trainable.safetensors")
    assert trained and all(t.dtype == torch.float32 for t in trained.values())
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    states = [s for s in opt["state"].values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in states)
    log = read_log(tmp_path / "out")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu(tmp_path, model_dir):
    cfg = write_config(tmp_path, model_dir, model={"name_or_path": str(model_dir), "dtype": "bfloat16"},
                       train={"precision": "bf16", "device": "cuda", "max_steps": 2, "save_every": 2})
    assert cli_main(["train", str(cfg)]) == 0
    trained = load_file(tmp_path / "out" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    assert all(t.dtype == torch.float32 for t in trained.values())


def test_manifest_instruction_falls_back_to_the_evaluation_one(tmp_path, model_dir):
    """Data with per-line prompts has no global one: inference then uses eval.query_instruction."""
    from denselm.config import load_config
    from denselm.train import build_model, build_tokenizer

    cfg = load_config(write_config(tmp_path, model_dir, data={"prompt": None},
                                   eval={"query_instruction": "Find the fruit"}))
    tok, added = build_tokenizer(cfg)
    assert build_model(cfg, tok, added).manifest["prompt"] == "Find the fruit"
    cfg.data.prompt = "Global prompt"
    assert build_model(cfg, tok, added).manifest["prompt"] == "Global prompt"
