"""denselm.io: atomic files and folders, umask modes, temp names, JSONL/gzip errors, OS errors, the fault hook."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from denselm import io
from denselm.errors import DataError, EnvironmentProblem, UserError


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(io.TMP_PREFIX))


# ------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, mask):
    with umask(mask):
        f = io.atomic_write(tmp_path / "a.json", "{}")
        with io.atomic_folder(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
    assert mode(f) == 0o666 & ~mask
    assert mode(tmp_path / "model") == 0o777 & ~mask
    assert mode(tmp_path / "model" / "w.bin") == 0o666 & ~mask


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    io.atomic_write(target, "one")
    io.atomic_write(target, b"two")
    assert target.read_text() == "two"
    assert temps(target.parent) == []


def test_atomic_folder_swaps_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with io.atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(KeyError), io.atomic_folder(target) as tmp:
        (tmp / "a").write_text("half")
        raise KeyError("a bug mid-write")
    assert (target / "a").read_text() == "old" and temps(tmp_path) == []
    with io.atomic_folder(target) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and temps(tmp_path) == []


@pytest.mark.parametrize("kind, words", [("enospc", "disk full writing"), ("eio", "Input/output error writing")])
def test_disk_full_and_io_error_are_one_line(tmp_path, kind, words):
    target = tmp_path / "out.json"
    io.atomic_write(target, "old")
    with io.faults(f"write:{kind}"), pytest.raises(EnvironmentProblem) as err:
        io.atomic_write(target, "new")
    assert str(err.value).startswith(words) and str(target) in str(err.value)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    assert target.read_text() == "old" and temps(tmp_path) == []


def test_disk_full_in_a_folder_names_disk_space(tmp_path):
    with io.faults("folder:enospc"), pytest.raises(EnvironmentProblem, match="disk full writing .*free space"):
        with io.atomic_folder(tmp_path / "m") as tmp:
            (tmp / "w").write_text("x")
    assert not (tmp_path / "m").exists() and temps(tmp_path) == []
    # torch.save reports a full disk as a RuntimeError ("unexpected pos"): the same one line
    with pytest.raises(EnvironmentProblem, match="disk full"), io.atomic_folder(tmp_path / "m") as tmp:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    with pytest.raises(RuntimeError, match="a real bug"), io.atomic_folder(tmp_path / "m"):
        raise RuntimeError("a real bug")


def test_fault_spec_counts_hits_and_rejects_bad_specs(tmp_path):
    with io.faults("write:crash@2"):
        io.atomic_write(tmp_path / "a", "1")
        with pytest.raises(RuntimeError, match="simulated crash at write"):
            io.atomic_write(tmp_path / "b", "2")
        io.atomic_write(tmp_path / "c", "3")  # fired once only
    assert not (tmp_path / "b").exists() and (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="POINT:KIND"):
        io.parse_faults("write:explode")
    io.fault_point("write")  # nothing armed: a no-op


KILL_SCRIPT = """
import sys
from denselm import io
io.atomic_write(sys.argv[1], "old")
io.atomic_write(sys.argv[1], "new " * 1000)
"""


def test_kill_mid_write_leaves_old_file_and_a_recognisable_temp(tmp_path):
    target = tmp_path / "out.txt"
    env = {**os.environ, io.FAULT_ENV: "write:kill@2"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(target)], env=env, timeout=120)
    assert proc.returncode == -9
    assert target.read_text() == "old"
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f"{io.TMP_PREFIX}") and "out.txt" in left[0]
    (tmp_path / "mine.txt").write_text("not denselm's")
    live = tmp_path / f"{io.TMP_PREFIX}{os.getppid()}-x-1"  # a running writer's temp (our parent is alive)
    live.write_text("in flight")
    removed = io.remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.txt", "mine.txt", live.name])


def test_remove_stale_temps_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{io.TMP_PREFIX}999999999-link").symlink_to(outside, target_is_directory=True)
    io.remove_stale_temps(work)
    assert (outside / "keep").exists() and list(work.iterdir()) == []


# ------------------------------------------------------------------------------- OS errors


def test_os_error_translation(tmp_path):
    p = tmp_path / "x"
    cases = {
        errno.ENOSPC: "disk full writing", errno.EACCES: "permission denied writing",
        errno.EROFS: "read-only file system writing", errno.ENOTDIR: "a part of the path is a regular file",
        errno.EIO: "Input/output error writing",
    }
    for code, words in cases.items():
        err = io.os_error(OSError(code, os.strerror(code)), p)
        assert isinstance(err, EnvironmentProblem) and words in str(err) and str(p) in str(err)
    missing = io.os_error(FileNotFoundError(errno.ENOENT, "No such file"), p, "reading")
    assert isinstance(missing, UserError) and missing.exit_code == 2


def test_writes_under_a_regular_file_fail_early_and_plainly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EnvironmentProblem, match="is a regular file"):
        io.check_writable(blocker / "out")
    with pytest.raises(EnvironmentProblem, match="regular file"):
        io.atomic_write(blocker / "out" / "a.json", "{}")
    with pytest.raises(EnvironmentProblem, match="regular file"):
        with io.atomic_folder(blocker / "model"):
            pass
    assert io.check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the check creates nothing


# ------------------------------------------------------------------------------- reading


def test_iter_jsonl_names_file_and_line(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_bytes(b'{"a": 1}\n\n{"a": 2}\n')
    assert list(io.iter_jsonl(good)) == [(1, {"a": 1}), (3, {"a": 2})]
    cases = {
        b'{"a": 1}\n{"a": \n': ":2: malformed JSON",
        b'{"a": 1}\n[1, 2]\n': ":2: expected a JSON object, got list",
        b'{"a": 1}\n{"a": "caf\xe9"}\n': ":2: invalid UTF-8 at byte 10 of the line",
    }
    for raw, words in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(raw)
        with pytest.raises(DataError) as err:
            list(io.iter_jsonl(bad))
        assert str(err.value).startswith(f"{bad}{words}")


def test_gzip_errors_name_the_users_file(tmp_path):
    payload = gzip.compress(b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(2000)))
    ok = tmp_path / "ok.jsonl.gz"
    ok.write_bytes(payload)
    assert sum(1 for _ in io.iter_jsonl(ok)) == 2000
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: truncated gzip file"):
        list(io.iter_jsonl(truncated))
    corrupt = tmp_path / "junk.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip at all\n")
    with pytest.raises(DataError, match=r"junk\.jsonl\.gz: corrupt gzip file"):
        list(io.iter_jsonl(corrupt))


def test_training_index_of_bad_gz_names_the_gz_not_the_cache(tmp_path, monkeypatch):
    from denselm.data.formats import index_file

    monkeypatch.setenv("DENSELM_CACHE", str(tmp_path / "cache"))
    line = json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}).encode() + b"\n"
    payload = gzip.compress(line * 3000)
    cut = tmp_path / "train.jsonl.gz"
    cut.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError) as err:
        index_file(cut)
    assert str(err.value).startswith(f"{cut}: truncated gzip file")
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError) as err:
        index_file(empty)
    assert str(err.value) == f"{empty}: no examples (the file is empty)"
    assert temps(tmp_path / "cache" / "jsonl") == []


def test_trec_and_qrels_readers_report_invalid_utf8(tmp_path):
    from denselm.beir import read_qrels

    run = tmp_path / "run.trec"
    run.write_bytes(b"q1 Q0 d1 1 0.5 t\nq1 Q0 d\xff 2 0.4 t\n")
    with pytest.raises(DataError, match=r"run\.trec:2: invalid UTF-8"):
        io.read_trec_run(run)
    qrels = tmp_path / "test.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\nq1\td\xff\t1\n")
    with pytest.raises(DataError, match=r"test\.tsv:2: invalid UTF-8"):
        read_qrels(qrels)


def test_read_json_names_the_file(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('{"a": ')
    with pytest.raises(DataError, match=r"manifest\.json:1: malformed JSON"):
        io.read_json(p)
