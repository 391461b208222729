"""FlagEmbedding's JSONL training format: schema, the seed's `type` table, validation, lazy reading.

One example a line::

    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...],   # optional teacher scores
     "prompt": str, "type": str, "category": str,              # optional
     "pos_id": str | int, "pos_ids": [...], "neg_ids": [...]}  # optional document ids

Document ids (aligned with `pos` / `neg`; `pos_id` gives every positive one id)
let ``data.mask_same_document`` drop any in-batch passage of the positive's
document from a query's negatives.

A path is a file or a folder of ``*.jsonl`` files; each file is one dataset.
``index_file`` validates every line in one streaming pass and keeps only the
byte offset of each line (numpy int64) plus a few counts, so multi-GB files
cost 8 bytes a line; ``JsonlFile.read(i)`` parses line i on demand through
mmap.  Any bad line stops the run with ``DataError("FILE:LINE: field 'x': ...")``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denselm.errors import DataError, InputNotFound
from denselm.io import atomic_write, iter_lines, parse_json_line


# --- the seed's `type` table -------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What a dataset's `type` means for grouping, formatting and the loss (the seed's table)."""

    type: str
    group: str
    """Which group size applies: "train" (group_size), "pair" (2), "symmetric" or "class"."""
    passages_like_queries: bool
    """Passages are formatted (and truncated) like queries: instruction + text + suffix."""
    mode: str
    """Default loss mode: "normal" (in-batch negatives) or "custom" (own group only)."""
    symmetric_batch: bool
    """Batches use data.symmetric_batch_size (the seed: any type containing 'symmetric')."""
    icl_response: str
    """Field used as the response of in-context examples: "pos" or "category"."""


# FlagEmbedding research/llm_dense_retriever/finetune/data.py, create_batch_data: the seed tests
# substrings of `type`; we accept exactly the names it is used with and reject anything else.
TASK_TYPES: dict[str, TaskSpec] = {
    "normal": TaskSpec("normal", "train", False, "normal", False, "pos"),
    "retrieval": TaskSpec("retrieval", "train", False, "normal", False, "pos"),
    "only_1neg": TaskSpec("only_1neg", "pair", False, "normal", False, "pos"),
    "symmetric_sts": TaskSpec("symmetric_sts", "symmetric", True, "normal", True, "pos"),
    "symmetric_clustering": TaskSpec("symmetric_clustering", "symmetric", True, "custom", True, "category"),
    "symmetric_class": TaskSpec("symmetric_class", "class", False, "custom", True, "pos"),
}
DEFAULT_TYPE = "normal"


def task_group_size(spec: TaskSpec, group_size: int, symmetric_group_size: int, max_class_neg: int) -> int:
    """Passages per query for this task (positive included)."""
    return {"train": group_size, "pair": 2, "symmetric": symmetric_group_size, "class": max_class_neg + 1}[
        spec.group
    ]


# --- examples --------------------------------------------------------------------------------------


@dataclass
class Example:
    """One parsed, validated line."""

    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    type: str = DEFAULT_TYPE
    category: str | None = None
    pos_ids: list[str] | None = None
    """Document id of each positive (aligned with ``pos``); None when the line has none."""
    neg_ids: list[str] | None = None
    """Document id of each negative (aligned with ``neg``); None when the line has none."""

    @property
    def has_scores(self) -> bool:
        return self.pos_scores is not None and self.neg_scores is not None


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _texts(obj: dict, name: str, where: str) -> list[str]:
    value = obj[name]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}': expected a list of strings, got {_kind(value)}")
    for j, text in enumerate(value):
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{name}[{j}]': expected a string, got {_kind(text)}")
    return value


def _scores(obj: dict, name: str, texts_name: str, n_texts: int, where: str) -> list[float] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}': expected a list of numbers, got {_kind(value)}")
    if len(value) != n_texts:
        raise DataError(
            f"{where}: field '{name}': {len(value)} scores for {n_texts} '{texts_name}' texts (must be aligned)"
        )
    for j, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{where}: field '{name}[{j}]': expected a finite number, got {s!r}")
    return [float(s) for s in value]


def _ids(obj: dict, name: str, texts_name: str, n_texts: int, where: str) -> list[str] | None:
    """Document ids aligned with a text list: strings or integers, kept as strings."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}': expected a list of ids (strings or integers), got {_kind(value)}")
    if len(value) != n_texts:
        raise DataError(f"{where}: field '{name}': {len(value)} ids for {n_texts} '{texts_name}' texts (must be aligned)")
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
            raise DataError(f"{where}: field '{name}[{j}]': expected a non-empty string or an integer, got {v!r}")
    return [str(v) for v in value]


def _optional_str(obj: dict, name: str, where: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_kind(value)}")
    return value


def parse_example(raw: bytes, where: str, needs_neg: bool = True) -> Example:
    """Decode, parse and validate one line; ``where`` is "FILE:LINE" for messages.

    ``needs_neg``: an empty or missing `neg` is an error (only a group size of 1
    needs no negatives).
    """
    obj = parse_json_line(raw, where)  # DataError for bad UTF-8, malformed JSON, a non-object
    query = obj.get("query")
    if query is None:
        raise DataError(f"{where}: field 'query': missing")
    if not isinstance(query, str):
        raise DataError(f"{where}: field 'query': expected a string, got {_kind(query)}")
    if not query:
        raise DataError(f"{where}: field 'query': empty string")
    if obj.get("pos") is None:
        raise DataError(f"{where}: field 'pos': missing")
    pos = _texts(obj, "pos", where)
    if not pos:
        raise DataError(f"{where}: field 'pos': empty list (each query needs at least one positive)")
    if obj.get("neg") is None:
        if needs_neg:
            raise DataError(f"{where}: field 'neg': missing (the group size needs negatives)")
        neg: list[str] = []
    else:
        neg = _texts(obj, "neg", where)
        if not neg and needs_neg:
            raise DataError(f"{where}: field 'neg': empty list (the group size needs negatives)")
    pos_scores = _scores(obj, "pos_scores", "pos", len(pos), where)
    neg_scores = _scores(obj, "neg_scores", "neg", len(neg), where)
    prompt = _optional_str(obj, "prompt", where)
    type_ = _optional_str(obj, "type", where)
    if type_ is None:
        type_ = DEFAULT_TYPE
    elif type_ not in TASK_TYPES:
        raise DataError(f"{where}: field 'type': unknown type {type_!r} (known: {', '.join(TASK_TYPES)})")
    category = _optional_str(obj, "category", where)
    pos_ids = _ids(obj, "pos_ids", "pos", len(pos), where)
    if obj.get("pos_id") is not None:
        if pos_ids is not None:
            raise DataError(f"{where}: fields 'pos_id' and 'pos_ids': give one of them")
        pos_ids = _ids({"pos_id": [obj["pos_id"]] * len(pos)}, "pos_id", "pos", len(pos), where)
    neg_ids = _ids(obj, "neg_ids", "neg", len(neg), where)
    return Example(query, pos, neg, pos_scores, neg_scores, prompt, type_, category, pos_ids, neg_ids)


# --- files: one validating pass, then lazy reads ----------------------------------------------------


@dataclass
class FileIndex:
    """What the validating pass keeps of a file: offsets and counts, never the texts."""

    path: str
    offsets: np.ndarray
    """(N,) int64 byte offset of each example line."""
    num_neg: np.ndarray
    """(N,) int32 negatives per example (for the repetition statistics)."""
    type: str
    num_with_scores: int
    """Examples carrying both pos_scores and neg_scores."""
    num_bytes: int

    def __len__(self) -> int:
        return len(self.offsets)


def index_file(
    path: str | os.PathLike,
    group_size: int = 8,
    symmetric_group_size: int = 8,
    max_class_neg: int = 7,
    prompt_available: bool = True,
) -> FileIndex:
    """Validate every line of a JSONL file; record where each example starts.

    The group size a line needs depends on its `type`, and one file is one
    dataset, so every line must have the same type (missing = "normal").
    ``prompt_available=False`` (an instruction template with no global prompt)
    makes a line without "prompt" an error.  Blank lines are skipped.
    """
    path = str(path)
    display = path
    if path.endswith(".gz"):
        # Byte offsets need a seekable file: decompress once into the cache; messages keep the .gz name.
        path = str(decompressed_copy(path))
    offsets = array("q")
    num_neg = array("i")
    num_with_scores = 0
    file_type: str | None = None
    first_line = 0
    needs_neg = True
    position = 0
    for line_no, start, raw in iter_lines(path, display):
        position = start + len(raw)
        if not raw.strip():
            continue
        where = f"{display}:{line_no}"
        if file_type is None:  # the first line's type decides whether negatives are needed
            ex = parse_example(raw, where, needs_neg=False)
            file_type, first_line = ex.type, line_no
            spec = TASK_TYPES[file_type]
            needs_neg = task_group_size(spec, group_size, symmetric_group_size, max_class_neg) > 1
            if needs_neg:
                ex = parse_example(raw, where, needs_neg=True)
        else:
            ex = parse_example(raw, where, needs_neg=needs_neg)
        if ex.type != file_type:
            raise DataError(
                f"{where}: field 'type': {ex.type!r} differs from {file_type!r} on line {first_line} "
                "(one file is one dataset with one type)"
            )
        if ex.prompt is None and not prompt_available:
            raise DataError(
                f"{where}: field 'prompt': missing, and no global prompt is set (data.prompt)"
            )
        offsets.append(start)
        num_neg.append(len(ex.neg))
        num_with_scores += ex.has_scores
    if not offsets:
        raise DataError(f"{display}: no examples (the file is empty)")
    return FileIndex(
        path=path,
        offsets=np.frombuffer(offsets, dtype=np.int64).copy(),
        num_neg=np.frombuffer(num_neg, dtype=np.int32).copy(),
        type=file_type or DEFAULT_TYPE,
        num_with_scores=num_with_scores,
        num_bytes=position,
    )


class JsonlFile:
    """Random access to the examples of an indexed file (mmap; reopened lazily in each worker)."""

    def __init__(self, index: FileIndex):
        self.index = index
        self._mm: mmap.mmap | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # an mmap does not pickle; DataLoader workers reopen the file
        return {"index": self.index, "_mm": None, "_pid": None}

    def _map(self) -> mmap.mmap:
        if self._mm is None or self._pid != os.getpid():
            with open(self.index.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._mm

    def read(self, i: int) -> Example:
        """Example i (0-based over the file's non-blank lines)."""
        mm = self._map()
        start = int(self.index.offsets[i])
        end = mm.find(b"\n", start)
        raw = mm[start : end if end >= 0 else len(mm)]
        # validated at start-up; re-checked cheaply so a file changed under us fails loudly
        return parse_example(raw, f"{self.index.path}:example {i}", needs_neg=False)


def decompressed_copy(path: str | os.PathLike) -> Path:
    """A plain copy of a gzipped JSONL file in ``$DENSELM_CACHE`` (default ~/.cache/denselm),
    keyed by the file's path, size and mtime; written atomically and reused."""
    import hashlib

    from denselm.io import atomic_file, copy_decompressed

    src = Path(path).resolve()
    st = src.stat()
    key = hashlib.sha1(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DENSELM_CACHE", Path.home() / ".cache" / "denselm")) / "jsonl"
    target = cache / f"{src.name[:-3]}.{key}"
    if not target.exists():
        with atomic_file(target) as fout:  # a corrupt or truncated .gz: one DataError naming the user's file
            copy_decompressed(src, fout, path)
    return target


def read_training_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a training JSONL file (``.gz`` too), each
    validated as an example (``needs_neg=False``); for commands that rewrite lines (mine, score)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"--input {path}: no such file")
    out = []
    for line_no, _offset, raw in iter_lines(path):
        if raw.strip():
            where = f"{path}:{line_no}"
            parse_example(raw, where, needs_neg=False)  # DataError names file:line:field
            out.append((line_no, parse_json_line(raw, where)))
    if not out:
        raise DataError(f"{path}: no examples (the file is empty)")
    return out


def write_jsonl(path: str | os.PathLike, objects) -> Path:
    """One JSON object a line, written atomically (never a half-written output)."""
    return atomic_write(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))


def discover_files(paths: list[str]) -> list[tuple[str, str]]:
    """(file, the train_data entry it came from) for every dataset file, in a stable order."""
    found: list[tuple[str, str]] = []
    for entry in paths:
        p = Path(entry)
        if p.is_file():
            found.append((str(p), entry))
        elif p.is_dir():
            files = sorted(str(f) for pattern in ("*.jsonl", "*.jsonl.gz") for f in p.rglob(pattern) if f.is_file())
            if not files:
                raise DataError(f"{entry}: folder has no *.jsonl or *.jsonl.gz files (data.train_data)")
            found.extend((f, entry) for f in files)
        else:
            raise DataError(f"{entry}: no such file or folder (data.train_data)")
    seen = set()
    for f, _ in found:
        if f in seen:
            raise DataError(f"{f}: listed twice in data.train_data (each file is one dataset)")
        seen.add(f)
    return found
