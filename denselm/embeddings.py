"""The embedding folder format that ``denselm encode`` writes and ``search``/``evaluate`` read.

    from denselm.embeddings import save_embedding_shard, write_embedding_manifest, load_embeddings

A folder holds ``shard-00000.npy`` (float32 or float16, [n, d]) + ``shard-00000.ids.json`` (list of
string ids), ``shard-00001...``, and ``manifest.json`` (``EMBEDDINGS_MANIFEST``), written last,
which marks the folder complete.  Every file is written atomically (``denselm.io``), the ids
before the array: a shard whose ``.npy`` exists is complete, so an interrupted encode resumes at
the first missing one.  (A model folder's own manifest is ``denselm.json``: another file.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError, InputNotFound
from .io import atomic_file, atomic_write, read_json

EMBEDDINGS_MANIFEST = "manifest.json"
MANIFEST_FORMAT = "denselm.embeddings"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npy$")


def shard_paths(folder: str | Path, index: int) -> tuple[Path, Path]:
    """(array path, ids path) of shard ``index``: shard-00000.npy, shard-00000.ids.json."""
    folder = Path(folder)
    return folder / f"shard-{index:05d}.npy", folder / f"shard-{index:05d}.ids.json"


def save_embedding_shard(
    folder: str | Path, index: int, ids: Sequence[str], array: np.ndarray
) -> Path:
    """Write shard ``index`` of an embedding folder: ids first, then the array, each atomically.

    The ``.npy`` file appears last, so a shard whose ``.npy`` exists is complete (an interrupted
    encode can resume at the first missing ``.npy``). float32 and float16 are kept as given.
    Returns the array's path.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"shard {index}: embeddings must be 2-D [n, dim], got shape {array.shape}")
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"shard {index}: embeddings must be float32 or float16, got {array.dtype}")
    ids = [str(i) for i in ids]
    if len(ids) != array.shape[0]:
        raise ValueError(f"shard {index}: {len(ids)} ids for {array.shape[0]} embeddings")
    npy_path, ids_path = shard_paths(folder, index)
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(ids_path, json.dumps(ids, ensure_ascii=False))
    with atomic_file(npy_path) as f:
        np.save(f, np.ascontiguousarray(array))
    return npy_path


def list_shards(folder: str | Path) -> list[int]:
    """Indices of the complete shards (``.npy`` present) in ascending order."""
    return sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := _SHARD_RE.match(p.name)))


def write_embedding_manifest(folder: str | Path, info: dict | None = None) -> dict:
    """Write ``manifest.json`` (last, atomically) describing the shards now in ``folder``.

    Fields: format, version, num_shards, count, dim, dtype, plus ``info`` (e.g. model, kind of
    texts, instruction). Shards must be numbered 0..n-1 without gaps. Returns the manifest.
    """
    folder = Path(folder)
    shards = list_shards(folder)
    if shards != list(range(len(shards))):
        raise DataError(f"{folder}: shards must be numbered 0..n-1 without gaps, found {shards}")
    count, dims, dtypes = 0, set(), set()
    for i in shards:
        arr = np.load(shard_paths(folder, i)[0], mmap_mode="r")  # header only, no data read
        count += arr.shape[0]
        dims.add(int(arr.shape[1]))
        dtypes.add(str(arr.dtype))
    if len(dims) > 1:
        raise DataError(f"{folder}: shards have different dimensions {sorted(dims)}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "num_shards": len(shards),
        "count": count,
        "dim": dims.pop() if dims else None,
        "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        **(info or {}),
    }
    atomic_write(folder / EMBEDDINGS_MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def load_embeddings(folder: str | Path, require_manifest: bool = True) -> tuple[list[str], np.ndarray]:
    """Read an embedding folder -> (ids, embeddings [N, d] float32), in shard order.

    Without ``manifest.json`` the folder is treated as incomplete (an encode still running or
    interrupted) and refused unless ``require_manifest=False``. Checks: shard numbering, the
    manifest's counts, ids matching rows, duplicate ids across shards.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFound(f"{folder}: embedding folder not found")
    manifest_path = folder / EMBEDDINGS_MANIFEST
    manifest = None
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "embedding folder manifest")
    elif require_manifest:
        raise DataError(
            f"{folder}: no {EMBEDDINGS_MANIFEST}; the encode that writes it did not finish (rerun it to resume)"
        )
    shards = list_shards(folder)
    if not shards:
        raise DataError(f"{folder}: no shard-*.npy files")
    if shards != list(range(len(shards))):
        raise DataError(f"{folder}: shards must be numbered 0..n-1 without gaps, found {shards}")
    if manifest is not None and manifest.get("num_shards") != len(shards):
        raise DataError(
            f"{manifest_path}: field 'num_shards' is {manifest.get('num_shards')} but {len(shards)} shards exist"
        )

    arrays = [np.load(shard_paths(folder, i)[0], mmap_mode="r") for i in shards]  # lazy, no copy yet
    dims = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if len(dims) != 1 or None in dims:
        raise DataError(f"{folder}: shards must all be 2-D with one dimension, got shapes {[a.shape for a in arrays]}")
    total = sum(a.shape[0] for a in arrays)
    if manifest is not None and manifest.get("count") not in (None, total):
        raise DataError(f"{manifest_path}: field 'count' is {manifest['count']} but shards hold {total} rows")

    ids: list[str] = []
    out = np.empty((total, dims.pop()), dtype=np.float32)  # filled shard by shard: one copy in memory
    row = 0
    for i, arr in zip(shards, arrays):
        ids_path = shard_paths(folder, i)[1]
        if not ids_path.is_file():
            raise DataError(f"{ids_path}: missing (every shard-NNNNN.npy needs its .ids.json)")
        shard_ids = read_json(ids_path, "shard ids")
        if not isinstance(shard_ids, list) or len(shard_ids) != arr.shape[0]:
            n = len(shard_ids) if isinstance(shard_ids, list) else type(shard_ids).__name__
            raise DataError(f"{ids_path}: expected a list of {arr.shape[0]} ids, got {n}")
        ids.extend(str(x) for x in shard_ids)
        out[row : row + arr.shape[0]] = arr
        row += arr.shape[0]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for x in ids:
            if x in seen:
                dup = x
                break
            seen.add(x)
        raise DataError(f"{folder}: duplicate id {dup!r} across shards")
    return ids, out


