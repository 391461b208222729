"""What a command does with an output that already exists: refuse, resume, or (``--overwrite``) replace.

    denselm train cfg.yaml                 # refused when train.output_dir is not empty
    denselm train cfg.yaml --resume        # continues it (the config may differ only in config.RESUMABLE_KEYS)
    denselm train cfg.yaml --overwrite     # clears it first: only the files denselm writes there
    denselm mine ... --output o.jsonl --overwrite

The policy (the README's table):

- ``train``: a non-empty ``train.output_dir`` needs ``--resume`` or ``--overwrite``; never two runs in
  one folder. ``--overwrite`` deletes only ``RUN_ENTRIES`` (and ``.denselm-tmp-*``), refuses a folder
  holding anything else, and never follows a symlink.
- ``encode``: resumes when the folder's plan names the same model, spec and input (``fingerprint_*``),
  else refuses naming what differs (``denselm.encode``).
- ``export``, ``mine``, ``score``, ``evaluate --output/--run-output``, ``doctor --json``,
  ``convert-gguf``: an existing output is refused unless ``--overwrite`` (``prepare_output``).
- every command: ``.denselm-tmp-*`` leftovers of a killed write of the same output are removed when it
  runs again (``denselm.io.remove_stale_temps``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from .errors import OutputExists, UserError
from .io import check_writable, is_temp_name, remove_stale_temps, translate_os_errors

RUN_ENTRIES = frozenset({
    "checkpoints",   # checkpoints/step-NNNNNNN (denselm.checkpoint)
    "model",         # the final model
    "model-merged",  # train.merge_lora
    "best",          # the best model by eval.metric
    "config.yaml",   # the resolved config of the run
    "log.jsonl",     # one line per logged step
    "tensorboard",   # train.tensorboard
})
"""Names ``denselm train`` writes directly inside ``train.output_dir`` (besides ``.denselm-tmp-*``)."""

_CHECKPOINT_ENTRY = re.compile(r"^step-\d+$")


def _foreign_entry(output_dir: Path) -> Path | None:
    """The first entry of a run folder that ``denselm train`` did not write (None when all are its own)."""
    for entry in sorted(output_dir.iterdir()):
        if is_temp_name(entry.name):
            continue
        if entry.name not in RUN_ENTRIES:
            return entry
        if entry.name == "checkpoints" and entry.is_dir() and not entry.is_symlink():
            for sub in sorted(entry.iterdir()):
                if not (_CHECKPOINT_ENTRY.match(sub.name) or is_temp_name(sub.name)):
                    return sub
    return None


def check_run_folder(output_dir: str | os.PathLike, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a run in a folder that holds another one (one line naming ``--resume`` and ``--overwrite``).

    Nothing is deleted here (``clear_run_folder`` does that, once the config is known to be good).
    """
    output_dir = Path(output_dir)
    if resume is not None and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or clear it and start over")
    if resume is not None or not output_dir.is_dir():
        return
    with translate_os_errors(output_dir, "reading"):
        entries = sorted(p.name for p in output_dir.iterdir())
        foreign = _foreign_entry(output_dir) if entries and overwrite else None
    if not entries:
        return
    if overwrite:
        if foreign is not None:
            raise OutputExists(
                f"--overwrite: train.output_dir {output_dir} holds {foreign}, which denselm did not write; "
                "move it away or choose another train.output_dir (nothing was deleted)"
            )
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise OutputExists(
        f"train.output_dir {output_dir} is not empty ({shown}); continue that run with --resume, "
        "or pass --overwrite to clear it and start over"
    )


def clear_run_folder(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what ``denselm train`` wrote in ``output_dir``; refuse (deleting nothing) if anything else is there.

    A symlink is unlinked, never followed (``shutil.rmtree`` does not follow the links inside a folder
    either). Returns the entries removed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    with translate_os_errors(output_dir, "reading"):
        foreign = _foreign_entry(output_dir)
    if foreign is not None:
        raise OutputExists(
            f"--overwrite: {output_dir} holds {foreign}, which denselm did not write; "
            "move it away or choose another folder (nothing was deleted)"
        )
    removed = []
    for entry in sorted(output_dir.iterdir()):
        with translate_os_errors(entry, "deleting"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        removed.append(entry)
    return removed


def prepare_output(path: str | os.PathLike | None, overwrite: bool, flag: str = "--output") -> Path | None:
    """Check an output file or folder before anything heavy loads: refused when it exists (unless
    ``overwrite``), writable, and its ``.denselm-tmp-*`` leftovers from a killed earlier write removed.

    The output itself is only replaced later, atomically, when the new one is complete.
    """
    if path is None:
        return None
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise OutputExists(f"{flag} {path}: the {kind} exists; pass --overwrite to replace it, or choose another {flag}")
    check_writable(path, flag)
    if path.parent.is_dir():
        remove_stale_temps(path.parent, target=path.name)
    return path


# ------------------------------------------------------------------------------- fingerprints

_EDGE = 1 << 20  # bytes hashed at each end of a file


def fingerprint_file(path: str | os.PathLike, digest=None) -> str:
    """SHA-256 of a file's size and its first and last MiB (whole when smaller than 2 MiB).

    Not its mtime: a copied file keeps its fingerprint. Cheap for a 10 GB weight file; a change that
    touches neither end nor the size goes unnoticed (not what retraining or re-downloading does).
    """
    h = digest or hashlib.sha256()
    path = Path(path)
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= 2 * _EDGE:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def fingerprint_folder(folder: str | os.PathLike) -> str:
    """``fingerprint_file`` over every file under ``folder`` (relative paths in sorted order; temps skipped)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_temp_name(d))
        for name in sorted(files):
            if is_temp_name(name):
                continue
            p = Path(root) / name
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            fingerprint_file(p, h)
    return h.hexdigest()


def fingerprint_texts(ids, texts) -> str:
    """SHA-256 of the (id, text) pairs in order: the content that is encoded, whatever file it came from."""
    h = hashlib.sha256()
    for i, t in zip(ids, texts):
        h.update(i.encode("utf-8", "surrogatepass") + b"\0")
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()
