"""Files: atomic writes, atomic folders, JSONL reading, OS errors in plain words, and the fault hook.

The one place denselm writes files from. Every output appears whole or not at all:

    from denselm import io
    io.atomic_write(out / "metrics.json", json.dumps(m))        # temp file + fsync + os.replace
    with io.atomic_folder(out / "model") as tmp:                  # build in a temp folder, then swap
        model.save_pretrained(tmp)
    for line_no, obj in io.iter_jsonl("corpus.jsonl.gz"):        # DataError "FILE:LINE: ..." on bad lines
        ...

Rules every writer here keeps:
- Temporary files and folders are named ``.denselm-tmp-<pid>-<name>-<random>`` (``TMP_PREFIX``) and
  live next to their target (so ``os.replace`` is atomic); ``remove_stale_temps`` deletes leftovers
  of killed runs, and only those.
- Outputs follow the umask: ``mkstemp``/``mkdtemp`` create 0600/0700, so the temp is chmod'ed to
  ``0o666 & ~umask`` / ``0o777 & ~umask`` before the rename (a model on shared storage stays readable).
- An ``OSError`` becomes one line naming the path and what to do (``os_error``): disk full and
  permission problems are ``EnvironmentProblem`` (exit 3).

Fault injection (tests only): ``fault_point(name)`` is called at named points:
``write`` (an atomic file fully in its temp, not yet renamed: what a kill mid-write leaves),
``folder`` / ``model`` / ``export`` / ``convert`` / ``checkpoint.commit`` (an atomic folder complete,
not yet renamed), ``checkpoint`` (between a checkpoint's files), ``train.step`` (after an optimizer
step), ``encode.shard`` (after a shard).  A spec ``POINT:KIND[@N]`` (comma-separated; POINT an
fnmatch pattern; fire at the N-th hit, default 1) comes from ``$DENSELM_FAULT`` (subprocess tests)
or ``with io.faults(spec):`` (in-process tests).  KIND is ``kill`` (SIGKILL: nothing can soften
it), ``crash`` (RuntimeError "simulated crash"), ``enospc`` or ``eio`` (the OSError a full or
failing disk raises).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gzip
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, DenseLMError, EnvironmentProblem, UserError

TMP_PREFIX = ".denselm-tmp-"
FAULT_ENV = "DENSELM_FAULT"

# ------------------------------------------------------------------------------- modes


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; locked so threads never see 0)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def _tmp_stem(target: Path) -> str:
    # the pid lets remove_stale_temps leave a live writer's temp alone
    return f"{TMP_PREFIX}{os.getpid()}-{target.name}-"


def is_temp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


# ------------------------------------------------------------------------------- OS errors


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def os_error(err: OSError, path: str | os.PathLike, action: str = "writing") -> DenseLMError:
    """A one-line user-facing error for ``err`` raised while ``action`` ``path``."""
    path = str(path)
    code = err.errno
    if code in _DISK_FULL:
        return EnvironmentProblem(f"disk full {action} {path}: free space and rerun (with --resume)")
    if code in _DENIED:
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return EnvironmentProblem(f"{why} {action} {path}: choose a folder you can write to, or fix its permissions")
    if code in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(Path(path))) is not None:
        return EnvironmentProblem(f"cannot create {path}: {blocker} is a regular file, not a folder")
    if code == errno.ENOTDIR:
        return EnvironmentProblem(f"cannot use {path}: a part of the path is a regular file, not a folder")
    if code == errno.ENOENT and action == "reading":
        return UserError(f"{path}: no such file or folder")
    if code == errno.EISDIR:
        return UserError(f"{path}: is a folder, expected a file")
    reason = err.strerror or type(err).__name__
    return EnvironmentProblem(f"{reason} {action} {path} (errno {code}): check the disk and rerun")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (mkdir's EEXIST/ENOTDIR)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


@contextlib.contextmanager
def translate_os_errors(path: str | os.PathLike, action: str = "writing"):
    """Turn an ``OSError`` inside the block into ``os_error(...)`` (one line, no traceback)."""
    try:
        yield
    except DenseLMError:
        raise
    except OSError as err:
        raise os_error(err, path, action) from err


def _disk_full_runtime_error(err: BaseException) -> bool:
    """torch.save / safetensors report a full disk as RuntimeError ("unexpected pos", "file write failed")."""
    msg = str(err)
    return isinstance(err, RuntimeError) and any(s in msg for s in ("unexpected pos", "write failed", "No space left"))


def check_writable(path: str | os.PathLike, what: str = "--output") -> Path:
    """Fail early (before any model loads) when ``path`` cannot be created or written.

    Walks up to the nearest existing ancestor: a regular file there, or a folder that refuses a
    test file, is an ``EnvironmentProblem`` naming the path.  Uses a real write rather than
    ``os.access`` (which says yes to root and to read-only mounts).
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise EnvironmentProblem(f"{what} {path}: cannot create it, {probe} is a regular file, not a folder")
    folder = probe if probe.is_dir() else probe.parent
    try:
        fd, name = tempfile.mkstemp(prefix=_tmp_stem(path), dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise os_error(err, path, "writing") from None
    return path


# ------------------------------------------------------------------------------- fault hook


@dataclass
class _Fault:
    pattern: str
    kind: str
    at: int
    hits: int = 0


_KINDS = ("kill", "crash", "enospc", "eio")
_env_faults: tuple[str, list[_Fault]] = ("", [])
_ctx_faults: list[_Fault] = []


def parse_faults(spec: str) -> list[_Fault]:
    """``"checkpoint:enospc@2,train.step:kill"`` -> faults; the one parser of fault specs."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, sep, rest = part.rpartition(":")
        kind, _, at = rest.partition("@")
        if not sep or kind not in _KINDS or (at and not at.isdigit()):
            raise ValueError(f"fault spec {part!r}: expected POINT:KIND[@N] with KIND one of {', '.join(_KINDS)}")
        out.append(_Fault(point, kind, int(at or 1)))
    return out


@contextlib.contextmanager
def faults(spec: str):
    """Arm faults for the block (in-process tests); hit counts start at zero."""
    armed = parse_faults(spec)
    _ctx_faults.extend(armed)
    try:
        yield armed
    finally:
        for f in armed:
            _ctx_faults.remove(f)


def fault_point(name: str) -> None:
    """A named point where a test may inject a fault; a no-op unless one is armed."""
    global _env_faults
    env = os.environ.get(FAULT_ENV, "")
    if env != _env_faults[0]:  # a new spec: counts restart
        _env_faults = (env, parse_faults(env))
    for f in (*_env_faults[1], *_ctx_faults):
        if not fnmatch.fnmatchcase(name, f.pattern):
            continue
        f.hits += 1
        if f.hits != f.at:
            continue
        if f.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if f.kind == "crash":
            raise RuntimeError(f"{FAULT_ENV} {f.pattern}:{f.kind}@{f.at}: simulated crash at {name}")
        code = errno.ENOSPC if f.kind == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code), f"<simulated at {name}>")


# ------------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Open a temp file next to ``path``; on success fsync, chmod to the umask's mode, rename.

    On any error the temp file is removed and ``path`` is untouched; OSErrors become one-line
    ``EnvironmentProblem``s naming ``path``.
    """
    path = Path(path)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    tmp = None
    try:
        with translate_os_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=_tmp_stem(path), dir=path.parent)
            tmp = Path(name)
            with os.fdopen(fd, mode, encoding=encoding) as f:
                yield f
            fault_point("write")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) so readers see the old file or the new one, never half."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, "wb") as f:
        f.write(raw)
    return Path(path)


atomic_write_text = atomic_write


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, point: str = "folder") -> Iterator[Path]:
    """Yield an empty temp folder next to ``path``; on success it replaces ``path`` whole.

    The old folder (if any) is renamed aside, the new one renamed in, the old one deleted: a crash
    leaves either the old or the new folder under ``path`` (plus a ``.denselm-tmp-*`` leftover at
    worst).  Disk-full errors, also torch's "unexpected pos", become one ``EnvironmentProblem``.
    ``point`` names the fault point hit just before the swap.
    """
    path = Path(path)
    tmp = None
    try:
        with translate_os_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_stem(path), dir=path.parent))
            os.chmod(tmp, dir_mode())
        try:
            yield tmp
        except RuntimeError as err:
            if _disk_full_runtime_error(err):
                raise EnvironmentProblem(f"disk full writing {path}: free space and rerun (with --resume)") from err
            raise
        with translate_os_errors(path):
            _fsync_tree(tmp)
            fault_point(point)
            if path.exists():
                old = path.parent / f"{_tmp_stem(path)}old-{secrets.token_hex(4)}"
                os.replace(path, old)
                os.replace(tmp, path)
                tmp = None
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
                tmp = None
            _fsync_dir(path.parent)
    except OSError as err:  # raised by the caller's block: still the user's disk
        raise os_error(err, path) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers at start-up are from nobody still writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP_TAIL = re.compile(r"-([a-z0-9_]{8}|old-[0-9a-f]{8})")
"""What follows the target's name in a temp (mkstemp's 8 random characters, or atomic_folder's old-HEX)."""


def remove_stale_temps(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete ``.denselm-tmp-*`` leftovers of killed writes directly inside ``folder``.

    Only names denselm makes are touched, symlinks are unlinked (never followed), and a temp whose
    writer (the pid in its name) is still running here is kept.  ``target``: only the temps of that
    output name (a shared parent folder's other temps may belong to a writer on another machine).
    Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not is_temp_name(entry.name):
            continue
        pid, _, rest = entry.name[len(TMP_PREFIX):].partition("-")
        if target is not None and not _TEMP_TAIL.fullmatch(rest[len(target):] if rest.startswith(target) else "x"):
            continue
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ------------------------------------------------------------------------------- reading


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _gzip_error(path, err) -> DataError:
    what = "truncated" if isinstance(err, EOFError) else "corrupt"
    return DataError(f"{path}: {what} gzip file ({err or type(err).__name__}); re-download or re-compress it")


def iter_lines(path: str | os.PathLike, display: str | os.PathLike | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield (1-based line number, byte offset, raw line with its newline) of a file, ``.gz`` or not.

    Opening and decompression errors name ``display`` (default ``path``): the user's file, even when
    denselm reads a cached copy of it.
    """
    path = Path(path)
    display = str(display or path)
    with translate_os_errors(display, "reading"):
        f = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    with f:
        offset, line_no = 0, 0
        try:
            for raw in f:
                line_no += 1
                yield line_no, offset, raw
                offset += len(raw)
        except _GZIP_ERRORS as err:
            raise _gzip_error(display, err) from None
        except OSError as err:
            raise os_error(err, display, "reading") from None


def copy_decompressed(src: str | os.PathLike, dst, display: str | os.PathLike | None = None) -> None:
    """Stream ``src`` (``.gz`` or plain) into the binary file object ``dst`` in 1 MiB blocks; a corrupt
    or truncated archive is one DataError naming ``display`` (default ``src``)."""
    src = Path(src)
    display = str(display or src)
    with translate_os_errors(display, "reading"):
        f = gzip.open(src, "rb") if src.name.endswith(".gz") else open(src, "rb")
    with f:
        try:
            while block := f.read(1 << 20):
                dst.write(block)
        except _GZIP_ERRORS as err:
            raise _gzip_error(display, err) from None


def decode_line(raw: bytes, where: str) -> str:
    """UTF-8 text of a raw line (newline stripped); DataError naming ``where`` (FILE:LINE) otherwise."""
    try:
        return raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: invalid UTF-8 at byte {err.start} of the line") from None


def parse_json_line(raw: bytes | str, where: str):
    """One JSON object from one line; DataError "FILE:LINE: ..." for bad UTF-8, bad JSON or a non-object."""
    text = decode_line(raw, where) if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise DataError(f"{where}: expected a JSON object, got {kind}")
    return obj


def iter_jsonl(path: str | os.PathLike, display: str | os.PathLike | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file (``.gz`` too)."""
    display = str(display or path)
    for line_no, _offset, raw in iter_lines(path, display):
        if raw.strip():
            yield line_no, parse_json_line(raw, f"{display}:{line_no}")


def iter_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line without its newline) of a text file (TSV, TREC runs)."""
    for line_no, _offset, raw in iter_lines(path):
        yield line_no, decode_line(raw, f"{path}:{line_no}")


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """A whole JSON file; malformed JSON or bad UTF-8 is a DataError naming the file."""
    with translate_os_errors(path, "reading"):
        raw = Path(path).read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: invalid UTF-8 at byte {err.start} ({what})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} ({what})") from None


# ------------------------------------------------------------------------------- TREC runs


def write_trec_run(path: str | os.PathLike, run: dict[str, dict[str, float]], tag: str = "denselm") -> None:
    """Write ``qid Q0 docid rank score tag`` lines, atomically.

    Within a query, lines are in trec_eval's order (score descending, then doc id descending), so
    the rank column agrees with how trec_eval and ``denselm.evaluate`` read the file. Scores are
    written with 9 significant digits (round-trips float32).
    """
    if not tag or any(ch.isspace() for ch in tag):
        raise UserError(f"--tag must be one word without spaces, got {tag!r}")
    lines = []
    for qid, hits in run.items():
        ordered = sorted(hits.items(), key=lambda item: (item[1], item[0]), reverse=True)
        for rank, (did, score) in enumerate(ordered, start=1):
            lines.append(f"{qid} Q0 {did} {rank} {score:.9g} {tag}\n")
    atomic_write(path, "".join(lines))


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a TREC run file -> query id -> doc id -> score (the rank column is not used, as in trec_eval)."""
    run: dict[str, dict[str, float]] = {}
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 6:
            raise DataError(f"{path}:{line_no}: expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
        qid, _, did, _, raw_score, _ = cols
        try:
            score = float(raw_score)
        except ValueError:
            raise DataError(f"{path}:{line_no}: field 'score' is not a number: {raw_score!r}") from None
        hits = run.setdefault(qid, {})
        if did in hits:
            raise DataError(f"{path}:{line_no}: document {did!r} listed twice for query {qid!r}")
        hits[did] = score
    return run


