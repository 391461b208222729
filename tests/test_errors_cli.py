"""The CLI's error policy: one line and exit 2 (input/config) or 3 (environment); bugs keep their traceback.

Every case calls ``denselm.cli.main`` in-process (only the ``python -m`` forms start a subprocess).
Permission cases use "a path under a regular file": CI may run as root, where chmod denies nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_helpers import numbered_rows, write_jsonl

from denselm import cli
from denselm.cli import main
from denselm.config import load_config
from denselm.errors import ConfigError, UserError


def one_line_error(capsys, command: str) -> str:
    """The one error line on stderr (log lines and progress bars may share stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"denselm {command}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: any output under it cannot be created (also as root)."""
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"text {i}"} for i in range(3)])


def train_config(tmp_path: Path, model: str, **train) -> Path:
    data = write_jsonl(tmp_path / "data" / "a.jsonl", numbered_rows("apple", 8, num_neg=3))
    cfg = {
        "model": {"name_or_path": model, "lora": {"r": 4, "alpha": 8}},
        "data": {"train_data": [str(data)], "group_size": 4, "query_max_len": 24, "passage_max_len": 24,
                 "prompt": "Given a fruit, retrieve its passage", "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "out"), "per_device_batch_size": 2, "max_steps": 2,
                  "tensorboard": False, **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------- the command line


def test_version_prints_it(capsys):
    from denselm import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"denselm {__version__}"


def test_unknown_command_says_so_with_a_suggestion(capsys):
    assert main(["nosuch"]) == 2
    assert "unknown command nosuch" in capsys.readouterr().err
    assert main(["serch"]) == 2
    assert "did you mean search?" in capsys.readouterr().err


@pytest.mark.parametrize("entry", [["-m", "denselm"], ["-m", "denselm.cli"]])
def test_python_dash_m_gives_one_line_errors(tmp_path, entry):
    proc = subprocess.run([sys.executable, *entry, "search", "--queries", str(tmp_path / "q"), "--corpus",
                           str(tmp_path / "c"), "--output", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("denselm search: error: ") and "Traceback" not in proc.stderr


def test_cli_error_is_the_user_error():
    assert cli.CliError is UserError


def test_bugs_keep_their_traceback(monkeypatch):
    import denselm.search

    def broken(args):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(denselm.search, "run", broken)
    with pytest.raises(ValueError, match="internal bug"):  # not turned into a one-line exit 2
        main(["search", "--queries", "q", "--corpus", "c", "--output", "r"])
    monkeypatch.setattr(denselm.search, "run", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["search", "--queries", "q", "--corpus", "c", "--output", "r"])


def test_logging_levels():
    cli.setup_logging(verbose=False)
    assert logging.getLogger("denselm").level == logging.INFO
    assert logging.getLogger().level == logging.WARNING  # faiss, bm25s, matplotlib chatter stays quiet
    cli.setup_logging(verbose=True)
    assert logging.getLogger("denselm").level == logging.DEBUG
    cli.setup_logging(verbose=False)
    assert sum(getattr(h, "_denselm", False) for h in logging.getLogger().handlers) == 1


# ------------------------------------------------------------------------------- config values


def test_override_typo_gets_a_real_suggestion(tmp_path, capsys):
    cfg = train_config(tmp_path, str(tmp_path))
    assert main(["train", str(cfg), "--train.lrr", "1e-3"]) == 2
    assert "unknown config key 'train.lrr' (did you mean train.lr?)" in one_line_error(capsys, "train")


@pytest.mark.parametrize("value", [".nan", "nan", "inf", "-.inf"])
def test_non_finite_floats_are_refused_naming_the_key(tmp_path, capsys, value):
    cfg = train_config(tmp_path, str(tmp_path))
    assert main(["train", str(cfg), "--train.lr", value]) == 2
    assert "train.lr must be a finite number" in one_line_error(capsys, "train")
    with pytest.raises(ConfigError, match=r"train.adam_betas\[1\] must be a finite number"):
        load_config(cfg, ["--train.adam_betas", f"[0.9, {value}]"])


def test_a_section_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(path, ["--train.lr", "1e-3"])  # not silently replaced by the defaults
    path.write_text("model:\n  lora: 3\n")
    with pytest.raises(ConfigError, match="model.lora must be a mapping"):
        load_config(path, ["--model.lora.r", "4"])


@pytest.mark.parametrize("metric", ["ndcg@x", "ndgc@10", "mrr", "recall@0"])
def test_eval_metric_typos_fail_before_training(tmp_path, capsys, metric):
    cfg = train_config(tmp_path, str(tmp_path / "no-model-needed"))
    assert main(["train", str(cfg), "--eval.metric", metric]) == 2  # before any model or data is read
    assert f"eval.metric must be ndcg@K, mrr@K, recall@K or map, got '{metric}'" in one_line_error(capsys, "train")
    for ok in ("ndcg@10", "mrr@100", "recall@5", "map"):
        assert load_config(cfg, ["--eval.metric", ok]).eval.metric == ok


# ------------------------------------------------------------------------------- bad files: exit 2


def test_invalid_utf8_input_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "corpus.jsonl"
    bad.write_bytes(b'{"_id": "d0", "text": "ok"}\n{"_id": "d1", "text": "caf\xe9"}\n')
    assert main(["encode", "--model", str(tmp_path / "m"), "--input", str(bad), "--output", str(tmp_path / "e")]) == 2
    assert f"{bad}:2: invalid UTF-8 at byte" in one_line_error(capsys, "encode")


def test_truncated_training_gz_names_the_users_file(tmp_path, capsys, monkeypatch):
    import gzip
    import json

    from tiny_models import make_model_dir

    monkeypatch.setenv("DENSELM_CACHE", str(tmp_path / "cache"))
    cfg = train_config(tmp_path, str(make_model_dir(tmp_path / "tiny")))
    line = json.dumps({"query": "q", "pos": ["p"], "neg": ["n", "m", "o"]}).encode() + b"\n"
    payload = gzip.compress(line * 3000)
    cut = tmp_path / "data" / "b.jsonl.gz"
    cut.write_bytes(payload[: len(payload) // 2])
    capsys.readouterr()  # make_model_dir's progress output
    assert main(["train", str(cfg), "--data.train_data", f"[{cut.parent}]"]) == 2  # a.jsonl and b.jsonl.gz
    assert f"{cut}: truncated gzip file" in one_line_error(capsys, "train")


# ------------------------------------------------------------------------------- environment: exit 3


def test_train_output_under_a_file_is_checked_before_the_model(tmp_path, blocker, capsys):
    cfg = train_config(tmp_path, "nosuch-org/nosuch-model", output_dir=str(blocker / "out"))
    assert main(["train", str(cfg)]) == 3  # the unreachable model is never looked up
    assert f"train.output_dir {blocker / 'out'}: cannot create it, {blocker} is a regular file" in one_line_error(capsys, "train")


def test_unreachable_model_name_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = train_config(tmp_path, "nosuch-org/nosuch-model")
    assert main(["train", str(cfg)]) == 3
    err = one_line_error(capsys, "train")
    assert "model.name_or_path nosuch-org/nosuch-model: neither a model folder here nor reachable" in err


def test_encode_output_under_a_file_is_checked_before_the_model(tmp_path, blocker, corpus, capsys):
    # --model does not exist: the writability check must fire first (exit 3, not the model's exit 2)
    assert main(["encode", "--model", str(tmp_path / "m"), "--input", str(corpus), "--output", str(blocker / "emb")]) == 3
    assert "is a regular file" in one_line_error(capsys, "encode")


def test_evaluate_export_mine_search_convert_check_outputs_first(tmp_path, blocker, capsys):
    fixture = Path(__file__).parent / "fixtures" / "beir_tiny"
    model = tmp_path / "not-a-model"
    model.mkdir()
    assert main(["evaluate", "--model", str(model), "--data", str(fixture), "--output", str(blocker / "m.json")]) == 3
    assert "is a regular file" in one_line_error(capsys, "evaluate")
    assert main(["export", "--model", str(model), "--output", str(blocker / "exp")]) == 3
    assert "is a regular file" in one_line_error(capsys, "export")
    lines = write_jsonl(tmp_path / "train.jsonl", numbered_rows("apple", 4, num_neg=2))
    assert main(["mine", "--model", str(model), "--input", str(lines), "--output", str(blocker / "o.jsonl")]) == 3
    assert "is a regular file" in one_line_error(capsys, "mine")
    # search: before reading embeddings (these do not even exist); convert-gguf: before reading the GGUF
    assert main(["search", "--queries", str(tmp_path / "q"), "--corpus", str(tmp_path / "c"),
                 "--output", str(blocker / "run.trec")]) == 3
    assert "is a regular file" in one_line_error(capsys, "search")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    assert main(["convert-gguf", "--gguf", str(fake), "--output", str(blocker / "model")]) == 3
    assert "is a regular file" in one_line_error(capsys, "convert-gguf")


def test_missing_extras_are_one_line(tmp_path, monkeypatch, capsys):
    lines = write_jsonl(tmp_path / "train.jsonl", numbered_rows("apple", 4, num_neg=2))
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ImportError
    assert main(["score", "--teacher", "minilm", "--input", str(lines), "--output", str(tmp_path / "o.jsonl")]) == 3
    assert "pip install 'denselm[score]'" in one_line_error(capsys, "score")
    monkeypatch.setitem(sys.modules, "bm25s", None)
    assert main(["demo", "--quick"]) == 3
    assert "pip install 'denselm[demo]'" in one_line_error(capsys, "demo")
    assert main(["mine", "--model", "bm25", "--input", str(lines), "--output", str(tmp_path / "m.jsonl")]) == 3
    assert "pip install 'denselm[mine]'" in one_line_error(capsys, "mine")


def test_demo_outside_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    import denselm.demo

    monkeypatch.setattr(denselm.demo, "REPO_ROOT", tmp_path)  # what a wheel install looks like
    assert main(["demo", "--quick"]) == 3
    assert "needs a source checkout" in one_line_error(capsys, "demo")


def test_tensorboard_missing_is_said_once(tmp_path, monkeypatch, caplog):
    from denselm.train import RunLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING, logger="denselm"):
        log = RunLog(tmp_path, enabled=True, tensorboard=True, resume_step=None)
    assert log.tb is None
    assert [r.message for r in caplog.records].count(
        f"train.tensorboard is true but tensorboard is not installed (pip install tensorboard); logging to "
        f"{tmp_path / 'log.jsonl'} only") == 1


@pytest.mark.timeout(300)
def test_disk_full_while_checkpointing(tmp_path, capsys):
    from tiny_models import make_model_dir

    from denselm import checkpoint as ckpt
    from denselm.io import faults

    model = make_model_dir(tmp_path / "tiny")
    cfg = train_config(tmp_path, str(model), max_steps=3, save_every=1, keep_last=5)
    with faults("checkpoint:enospc@2"):  # the second checkpoint hits a full disk
        assert main(["train", str(cfg)]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("denselm train: error: disk full writing"), err  # tqdm shares stderr
    assert "step-0000002" in err[0] and "free space" in err[0]
    out = tmp_path / "out"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000001"]  # consistent, complete
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no half folder
    assert main(["train", str(cfg), "--resume"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == "step-0000003"


def test_encode_progress_advances_per_batch(tmp_path):
    from test_encode import save_tiny_denselm

    from denselm.inference import load_encoder

    enc = load_encoder(save_tiny_denselm(tmp_path / "m"), device="cpu", show_progress=False, batch_size=4)
    calls = []
    enc.on_batch = calls.append
    enc.encode_corpus([f"text number {i}" for i in range(10)])
    assert calls == [4, 4, 2]


@pytest.mark.timeout(300)
def test_kill_mid_checkpoint_then_resume_cleans_leftovers(tmp_path):
    from tiny_models import make_model_dir

    from denselm import checkpoint as ckpt
    from denselm.io import FAULT_ENV, TMP_PREFIX

    cfg = train_config(tmp_path, str(make_model_dir(tmp_path / "tiny")), max_steps=3, save_every=1, keep_last=5)
    env = {**os.environ, FAULT_ENV: "checkpoint:kill@2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "denselm", "train", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "out" / "checkpoints"
    left = [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(left) == 1 and "step-0000002" in left[0]  # the half-written checkpoint, recognisably named
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["step-0000001"]
    assert main(["train", str(cfg), "--resume"]) == 0
    assert [p.name for p in root.iterdir()] and not [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["step-0000001", "step-0000002", "step-0000003"]
