"""Small helpers shared by the data-pipeline tests: a tiny offline tokenizer, JSONL writers, the build scripts as modules."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``scripts/NAME.py`` imported as module ``NAME`` (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module

WORDS = (
    "the a of to and in is it for on with as was at by an be this that from or have not are but what "
    "which query passage answer question python list dict function return value error file line field "
    "retrieve relevant given instruct response apple banana cherry grape lemon mango orange pear plum"
).split()


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    corpus += ["Instruct: Given a query\nQuery: what\nResponse: answer\n\n"] * 5
    tok.train_from_iterator(corpus, trainer)
    # BOS in front, like Llama/Mistral tokenizers: exercises the prefix handling of tokenize_with_eos
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def make_tokenizer():
    """A byte-level BPE (exact decode round trip) with BOS <s>, EOS </s>, PAD <pad>; fresh each call."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )


def row(query: str, pos, neg, **extra) -> dict:
    return {"query": query, "pos": list(pos), "neg": list(neg), **extra}


def write_jsonl(path: Path, rows) -> Path:
    """Write dicts as JSON lines (strings are written verbatim, for malformed-line tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def numbered_rows(prefix: str, n: int, num_neg: int = 7, **extra) -> list[dict]:
    """n examples with distinct texts that name their dataset and index (q3 -> p3, n3_0 ...)."""
    return [
        row(f"{prefix} q{i}", [f"{prefix} p{i}"], [f"{prefix} n{i}_{j}" for j in range(num_neg)], **extra)
        for i in range(n)
    ]
