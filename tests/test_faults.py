"""Faults as a user meets them, through the real CLI: kills and resumes, runs that would mix, bad
files, unwritable outputs, and what each command does with an output that exists.

Kill/resume cases start ``python -m denselm.cli`` subprocesses (a tiny model, about 10 s each) and
inject the kill through the io layer's fault hook (``DENSELM_FAULT``); every other case calls
``denselm.cli.main`` in-process. Permission cases use "a path under a regular file" (CI may run as
root). Neighbouring cases live in test_errors_cli.py (exit codes, disk full while checkpointing,
kill mid-checkpoint cleanup) and test_io.py (the io layer itself).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from data_helpers import numbered_rows, write_jsonl
from test_encode import corpus_rows, save_tiny_denselm, stamps
from test_errors_cli import one_line_error
from test_train import _run_cli, read_log, write_config
from tiny_models import make_model_dir

from denselm import checkpoint as ckpt
from denselm.cli import main
from denselm.io import TMP_PREFIX, faults

FIXTURE_BEIR = Path(__file__).parent / "fixtures" / "beir_tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def temps_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(f"{TMP_PREFIX}*"))


def entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------- kill, then --resume


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_dir):
    """An uninterrupted 4-step run (subprocess, one thread: the numbers every resumed run must match)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = write_config(root, model_dir, train={"max_steps": 4, "save_every": 1, "output_dir": str(root / "out")})
    _run_cli(["train", str(cfg)])
    return root / "out"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault, resumes_from", [
    ("checkpoint.commit:kill@2", "step-0000001"),  # step 2's checkpoint whole in its temp, not renamed
    pytest.param("checkpoint:kill@3", "step-0000002", marks=pytest.mark.slow),  # between a checkpoint's files
    pytest.param("model:kill@1", "step-0000004", marks=pytest.mark.slow),  # mid final model save
])
def test_kill_mid_write_then_resume_is_bit_exact(tmp_path, model_dir, reference_run, fault, resumes_from):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, model_dir, train={"max_steps": 4, "save_every": 1, "output_dir": str(out)})
    killed = _run_cli(["train", str(cfg)], env_extra={"DENSELM_FAULT": fault}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert temps_under(out), "a kill mid-write leaves a recognisable .denselm-tmp-* leftover"
    assert ckpt.list_checkpoints(out)[-1].name == resumes_from
    assert not (out / "model").exists()

    _run_cli(["train", str(cfg), "--resume"])

    ref, resumed = read_log(reference_run), read_log(out)
    assert sorted(resumed) == sorted(ref) == [1, 2, 3, 4]
    assert [resumed[s]["loss"] for s in range(1, 5)] == [ref[s]["loss"] for s in range(1, 5)]  # bit-exact
    a = load_file(out / "checkpoints" / "step-0000004" / "trainable.safetensors")
    b = load_file(reference_run / "checkpoints" / "step-0000004" / "trainable.safetensors")
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert temps_under(out) == []  # the killed write's leftover is gone after the resume
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000003", "step-0000004"]  # keep_last 2


# ------------------------------------------------------------------------------- runs that would mix


def small_config(tmp_path: Path, model: str | Path, **train) -> Path:
    return write_config(tmp_path, Path(model), train={"max_steps": 3, "save_every": 1, **train})


@pytest.mark.timeout(300)
def test_rerun_without_resume_is_refused_and_overwrite_starts_clean(tmp_path, model_dir, capsys):
    cfg = small_config(tmp_path, model_dir)
    out = tmp_path / "out"
    with faults("train.step:crash@2"), pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(cfg)])  # a run that died after step 2 (its checkpoint written)
    crashed_log = (out / "log.jsonl").read_text()
    before = entries(out)
    assert sorted(read_log(out)) == [1, 2]
    capsys.readouterr()

    assert main(["train", str(cfg)]) == 2  # never mixed with the crashed run
    line = one_line_error(capsys, "train")
    assert f"train.output_dir {out} is not empty" in line and "--resume" in line and "--overwrite" in line
    assert entries(out) == before and (out / "log.jsonl").read_text() == crashed_log

    assert main(["train", str(cfg), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in one_line_error(capsys, "train")

    assert main(["train", str(cfg), "--overwrite"]) == 0
    log = read_log(out)
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]  # not 1,2,1,2,3
    crashed = {r["step"]: r for r in map(json.loads, crashed_log.splitlines())}
    assert log[1]["loss"] == crashed[1]["loss"]  # a fresh start, not a continuation
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000002", "step-0000003"]
    assert (out / "model").is_dir() and temps_under(out) == []


@pytest.mark.timeout(300)
def test_resume_before_the_first_checkpoint_starts_over_without_mixing_logs(tmp_path, model_dir):
    cfg = small_config(tmp_path, model_dir, save_every=0, max_steps=2)
    out = tmp_path / "out"
    with faults("train.step:crash@1"), pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(cfg)])  # died after logging step 1, before any checkpoint
    assert sorted(read_log(out)) == [1] and ckpt.list_checkpoints(out) == []
    assert main(["train", str(cfg), "--resume"]) == 0  # nothing to resume: from step 0, old lines dropped
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def fake_run_folder(out: Path, outside: Path) -> None:
    """What an earlier run leaves, plus symlinks that point out of the folder."""
    (out / "checkpoints" / "step-0000001").mkdir(parents=True)
    (out / "checkpoints" / "step-0000001" / "trainer_state.json").write_text("{}")
    (out / "checkpoints" / "step-0000001" / "escape").symlink_to(outside, target_is_directory=True)
    (out / "checkpoints" / f"{TMP_PREFIX}1-step-0000002-abcdefgh").mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "config.yaml").write_text("train: {}\n")
    (out / "tensorboard").mkdir()
    (out / "model").symlink_to(outside, target_is_directory=True)  # a model "saved" elsewhere


@pytest.mark.timeout(300)
def test_overwrite_deletes_only_denselm_files_and_never_follows_symlinks(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"keep me")
    out = tmp_path / "out"
    fake_run_folder(out, outside)
    cfg = small_config(tmp_path, model_dir, output_dir=str(out))
    before = entries(out)

    for foreign in (out / "notes.txt", out / "checkpoints" / "mine.bin"):
        foreign.write_text("the user's")
        assert main(["train", str(cfg), "--overwrite"]) == 2
        line = one_line_error(capsys, "train")
        assert f"holds {foreign}, which denselm did not write" in line and "nothing was deleted" in line
        foreign.unlink()
        assert entries(out) == before

    # an unreachable model fails before anything is deleted: the old run survives the typo
    assert main(["train", str(cfg), "--overwrite", "--model.name_or_path", "nosuch-org/nosuch-model"]) == 3
    assert entries(out) == before

    assert main(["train", str(cfg), "--overwrite"]) == 0
    assert (outside / "precious.bin").read_bytes() == b"keep me"  # neither symlink was followed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "log.jsonl", "model"]
    assert not (out / "model").is_symlink() and (out / "model" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


@pytest.mark.timeout(300)
def test_resume_with_a_shape_changing_setting_names_each_key(tmp_path, model_dir, capsys, monkeypatch):
    cfg = small_config(tmp_path, model_dir, max_steps=1)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()

    import denselm.train

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load before the config check")

    with monkeypatch.context() as m:
        m.setattr(denselm.train, "build_model", no_model)
        assert main(["train", str(cfg), "--resume", "--model.lora.r", "8", "--model.num_layers", "1"]) == 2
    line = one_line_error(capsys, "train")
    assert "model.lora.r 4 -> 8" in line and "model.num_layers null -> 1" in line
    assert "size mismatch" not in line and "train.max_steps" not in line
    # the keys in config.RESUMABLE_KEYS may change: more steps, other cadence
    assert main(["train", str(cfg), "--resume", "--train.max_steps", "2", "--train.log_every", "1",
                 "--eval.batch_size", "8", "--train.keep_last", "3"]) == 0
    assert sorted(read_log(tmp_path / "out")) == [1, 2]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["step-0000001", "step-0000002"]


def test_resumable_keys_exist():
    from denselm.config import RESUMABLE_KEYS, Config, _flatten

    known = set(_flatten(Config().to_dict()))
    assert RESUMABLE_KEYS <= known, sorted(RESUMABLE_KEYS - known)


@pytest.mark.timeout(300)
def test_disk_full_at_the_final_save_keeps_checkpoints_and_resumes(tmp_path, model_dir, capsys):
    cfg = small_config(tmp_path, model_dir, max_steps=2)
    out = tmp_path / "out"
    with faults("model:enospc"):
        assert main(["train", str(cfg)]) == 3
    line = one_line_error(capsys, "train")
    assert f"disk full writing {out / 'model'}" in line and "free space" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000001", "step-0000002"]
    assert not (out / "model").exists() and temps_under(out) == []
    assert main(["train", str(cfg), "--resume"]) == 0
    assert (out / "model").is_dir() and sorted(read_log(out)) == [1, 2]


# ------------------------------------------------------------------------------- bad files


def test_corrupt_gzip_input_names_the_file(tmp_path, capsys):
    bad = tmp_path / "corpus.jsonl.gz"
    good = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in corpus_rows(50)))
    bad.write_bytes(good[:10] + bytes(b ^ 0x5A for b in good[10:]))  # the header is fine, the stream is not
    assert main(["encode", "--model", str(tmp_path / "m"), "--input", str(bad), "--output", str(tmp_path / "e")]) == 2
    line = one_line_error(capsys, "encode")
    assert f"{bad}: corrupt gzip file" in line and not (tmp_path / "e").exists()


def test_invalid_utf8_in_a_beir_corpus_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "beir"
    shutil.copytree(FIXTURE_BEIR, data)
    lines = (data / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"cherry", b"ch\xe9rry")
    (data / "corpus.jsonl").write_bytes(b"".join(lines))
    model = tmp_path / "m"
    model.mkdir()
    assert main(["evaluate", "--model", str(model), "--data", str(data)]) == 2  # before the model loads
    assert f"{data / 'corpus.jsonl'}:3: invalid UTF-8 at byte" in one_line_error(capsys, "evaluate")


def test_invalid_utf8_in_training_data_names_file_and_line(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("DENSELM_CACHE", str(tmp_path / "cache"))
    cfg = small_config(tmp_path, model_dir)
    bad = tmp_path / "data" / "a.jsonl"
    lines = bad.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b"apple", b"appl\xff")
    bad.write_bytes(b"".join(lines))
    assert main(["train", str(cfg)]) == 2
    assert f"{bad}:5: invalid UTF-8 at byte" in one_line_error(capsys, "train")
    assert not (tmp_path / "out").exists()  # nothing written: the next run needs no --overwrite


def test_doctor_and_score_outputs_under_a_file_fail_first(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    lines = write_jsonl(tmp_path / "train.jsonl", numbered_rows("apple", 4, num_neg=2))
    assert main(["doctor", str(lines), "--json", str(blocker / "r.json")]) == 3
    assert f"--json {blocker / 'r.json'}: cannot create it, {blocker} is a regular file" in one_line_error(capsys, "doctor")
    # the teacher ("minilm") is never loaded
    assert main(["score", "--teacher", "minilm", "--input", str(lines), "--output", str(blocker / "o.jsonl")]) == 3
    assert "is a regular file" in one_line_error(capsys, "score")


# ------------------------------------------------------------------------------- existing outputs


def existing_output_cases(tmp_path: Path) -> list[tuple[str, list[str], Path]]:
    """(command, argv, output) where each output exists: refused unless --overwrite, before any model loads."""
    model = tmp_path / "model"
    model.mkdir()
    lines = write_jsonl(tmp_path / "train.jsonl", numbered_rows("apple", 6, num_neg=2))
    outs = {name: tmp_path / name for name in ("exported", "mined.jsonl", "scored.jsonl", "metrics.json",
                                                 "run.trec", "report.json")}
    outs["exported"].mkdir()
    for name, path in outs.items():
        if not path.is_dir():
            path.write_text("an earlier result\n")
    return [
        ("export", ["--model", str(model), "--output", str(outs["exported"])], outs["exported"]),
        ("mine", ["--model", "bm25", "--input", str(lines), "--output", str(outs["mined.jsonl"])], outs["mined.jsonl"]),
        ("score", ["--teacher", "minilm", "--input", str(lines), "--output", str(outs["scored.jsonl"])],
         outs["scored.jsonl"]),
        ("evaluate", ["--model", str(model), "--data", str(FIXTURE_BEIR), "--output", str(outs["metrics.json"])],
         outs["metrics.json"]),
        ("evaluate", ["--model", str(model), "--data", str(FIXTURE_BEIR), "--run-output", str(outs["run.trec"])],
         outs["run.trec"]),
        ("doctor", [str(lines), "--json", str(outs["report.json"])], outs["report.json"]),
    ]


def test_existing_outputs_are_refused_without_overwrite(tmp_path, capsys):
    for command, argv, out in existing_output_cases(tmp_path):
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
        assert main([command, *argv]) == 2, command
        line = one_line_error(capsys, command)
        assert str(out) in line and "exists; pass --overwrite to replace it" in line, line
        assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before


def test_overwrite_replaces_and_cleans_only_its_own_stale_temps(tmp_path, capsys):
    pytest.importorskip("bm25s")
    lines = write_jsonl(tmp_path / "train.jsonl", numbered_rows("apple", 6, num_neg=2))
    out = tmp_path / "mined.jsonl"
    out.write_text("an earlier result\n")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    mine = tmp_path / f"{TMP_PREFIX}{dead}-mined.jsonl-abcd_123"  # a killed write of this output
    mine_stats = tmp_path / f"{TMP_PREFIX}{dead}-mined.jsonl.stats.json-zzzz0000"
    other = tmp_path / f"{TMP_PREFIX}{dead}-other.jsonl-abcd_123"  # another output's: not ours to judge
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}-mined.jsonl-live0000"  # its writer still runs
    for p in (mine, mine_stats, other, live):
        p.write_text("half")
    assert main(["mine", "--model", "bm25", "--input", str(lines), "--output", str(out), "--num-negatives", "2",
                 "--overwrite"]) == 0
    assert out.read_text() != "an earlier result\n" and len(out.read_text().splitlines()) == 6
    assert not mine.exists() and not mine_stats.exists() and other.exists() and live.exists()


# ------------------------------------------------------------------------------- encode: resume by content


@pytest.mark.timeout(300)
def test_encode_resumes_only_the_same_model_spec_and_input(tmp_path, capsys):
    model = save_tiny_denselm(tmp_path / "model")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(7))
    out = tmp_path / "emb"

    def encode(model_dir, input_path, *extra) -> int:
        return main(["encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(input_path), "--output", str(out),
                     "--shard-size", "3", "--device", "cpu", *extra])

    with faults("encode.shard:crash@2"), pytest.raises(RuntimeError, match="simulated crash"):
        encode(model, corpus)
    plan = json.loads((out / "encode_plan.json").read_text())
    assert {"model_sha256", "input_sha256", "template", "query_max_len", "passage_max_len"} <= set(plan)
    before = stamps(out)
    capsys.readouterr()

    other_model = save_tiny_denselm(tmp_path / "other", passage_max_len=40)  # other weights and spec
    assert encode(other_model, corpus) == 2
    line = one_line_error(capsys, "encode")
    assert "the model's files (--model) differ" in line and "passage_max_len: 48 -> 40" in line

    edited = write_jsonl(tmp_path / "edited.jsonl", [{**r, "text": r["text"] + " (edited)"} if i == 5 else r
                                                     for i, r in enumerate(corpus_rows(7))])
    assert encode(model, edited) == 2  # same ids, one text changed
    line = one_line_error(capsys, "encode")
    assert "the input texts (--input) differ" in line and "input ids" not in line
    assert stamps(out) == before

    moved_model, moved_corpus = tmp_path / "moved-model", tmp_path / "elsewhere" / "corpus.jsonl"
    shutil.copytree(model, moved_model)
    moved_corpus.parent.mkdir()
    shutil.copy(corpus, moved_corpus)
    assert encode(moved_model, moved_corpus) == 0  # same content at other paths: resumes
    after = stamps(out)
    assert {i: after[i] for i in before} == before and sorted(after) == [0, 1, 2]
