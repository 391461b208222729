"""A teacher's text embeddings, computed once and cached on disk, for embedding distillation.

    denselm train CONFIG.yaml --loss.embed_distill_teacher minilm --loss.embed_distill_weight 1.0

    from denselm.teacher_embeddings import TeacherEmbeddings
    teacher = TeacherEmbeddings("minilm", cache="~/.cache/denselm/teacher-embeddings.sqlite")
    vectors = teacher.embed(["a text", "another"])  # (2, 384) float32; a second call reads the cache

The cache is one SQLite file keyed by (teacher, sha256 of the text): every run,
rank and data-loader process that embeds the same text with the same teacher
reads the same row, and a text is encoded once ever.  ``teacher`` in the key is
the resolved folder's name plus its ``config_sentence_transformers.json`` /
``config.json`` digest, so two different models never share rows.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_CACHE = "~/.cache/denselm/teacher-embeddings.sqlite"
TEACHER_DTYPES = ("float32", "bfloat16")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def teacher_id(path: Path) -> str:
    """A stable name for a teacher folder: its name and a digest of its config files."""
    h = hashlib.sha256()
    for name in ("config.json", "config_sentence_transformers.json", "modules.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return f"{path.name}:{h.hexdigest()[:16]}"


class TeacherEmbeddings:
    """Embeddings of texts by a sentence-transformers teacher (a folder, or ``minilm``), cached on disk."""

    def __init__(self, teacher: str, cache: str | os.PathLike | None = None, device: str | None = "cpu",
                 batch_size: int = 64, model=None, dtype: str = "float32", max_length: int | None = None):
        from .assets import resolve

        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher dtype must be one of {TEACHER_DTYPES}, got {dtype!r}")
        self.spec, self.dtype = teacher, dtype
        self.path = Path(resolve(teacher)) if model is None else None
        self.id = teacher_id(self.path) if self.path is not None else f"in-memory:{teacher}"
        if dtype != "float32":  # bf16 vectors differ slightly: never mixed with float32 rows in one cache
            self.id += f":{dtype}"
        if max_length is not None:  # another truncation, other vectors
            if max_length < 1:
                raise ValueError(f"teacher max_length must be >= 1, got {max_length}")
            self.id += f":max{max_length}"
        self.max_length = max_length
        self.cache_path = Path(os.path.expanduser(str(cache or DEFAULT_CACHE)))
        self.device, self.batch_size = device, batch_size
        self._model = model
        self.computed = 0
        """Texts encoded by the teacher in this process (cache misses)."""
        self.cache_hits = 0
        self._db: sqlite3.Connection | None = None

    def __getstate__(self):  # DataLoader workers: reopen the database, reload the model on use
        state = dict(self.__dict__)
        state["_db"], state["_model"] = None, None if self.path is not None else self._model
        return state

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    @property
    def model(self):
        if self._model is None:
            from .score import load_teacher

            self._model = load_teacher(self.spec, "bi-encoder", device=self.device, max_length=self.max_length)
            if self.dtype == "bfloat16":
                import torch

                self._model = self._model.to(torch.bfloat16)
        return self._model

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.cache_path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (teacher TEXT, key TEXT, vec BLOB, "
                             "PRIMARY KEY (teacher, key))")
        return self._db

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), Dt) float32: cached rows, the rest encoded (once per distinct text) and stored."""
        keys = [text_key(t) for t in texts]
        unique = list(dict.fromkeys(keys))
        db = self._conn()
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(unique), 500):  # SQLite's parameter limit
            chunk = unique[start : start + 500]
            rows = db.execute(
                f"SELECT key, vec FROM emb WHERE teacher = ? AND key IN ({','.join('?' * len(chunk))})",
                [self.id, *chunk],
            ).fetchall()
            found.update({k: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        missing = [k for k in unique if k not in found]
        self.cache_hits += len(unique) - len(missing)
        if missing:
            from denselm.score import teacher_texts

            text_of = dict(zip(keys, texts))
            # only a bounded prefix of each text reaches the teacher's tokenizer (same tokens after its truncation)
            inputs = teacher_texts(self.model, [text_of[k] for k in missing], getattr(self.model, "max_seq_length", None))
            vecs = self.model.encode(inputs, batch_size=self.batch_size, convert_to_tensor=True,
                                     show_progress_bar=False).float().cpu().numpy()  # bf16 teachers: float32 rows
            self.computed += len(missing)
            with db:
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
                               [(self.id, k, v.tobytes()) for k, v in zip(missing, vecs)])
            found.update(zip(missing, vecs))
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)
