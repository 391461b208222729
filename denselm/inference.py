"""Encoding text at inference: the same formatting and tokenisation as training, batched fast.

    enc = load_encoder("out/model")                 # a denselm folder (LoRA or merged)
    q = enc.encode_queries(["how do I sort a dict?"])   # (n, D) float32 numpy
    d = enc.encode_corpus(["Use sorted(d.items()) ..."])

Texts are sorted by length and cut into batches bounded by a row count and a
token budget, so padding stays small; results come back in input order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError, InputNotFound, UserError
from .data.templates import ICLExample, fit_queries, format_passage
from .data.tokenize import pad_batch, special_tokens, tokenize_with_eos
from .model.encoder import MANIFEST_NAME, BiEncoderModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """How a plain transformers embedder formats and pools (for folders without a denselm manifest)."""

    template: str
    pooling: str = "last"
    normalized: bool = True
    prompt: str | None = None
    query_max_len: int = 512
    passage_max_len: int = 512


PRESETS: dict[str, Preset] = {
    "bge-en-icl": Preset("bge-icl", prompt="Given a web search query, retrieve relevant passages that answer the query."),
    "e5-mistral": Preset("e5-mistral", prompt="Given a web search query, retrieve relevant passages that answer the query"),
    "qwen3-embedding": Preset("qwen3-embedding", prompt="Given a web search query, retrieve relevant passages that answer the query"),
    "plain": Preset("none"),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Encoder:
    """Encodes queries and passages with a BiEncoderModel and its manifest's settings."""

    on_batch = None
    """Optional callable(rows) after each forward pass (``denselm encode``'s progress bar)."""

    def __init__(
        self,
        model: BiEncoderModel,
        tokenizer=None,
        *,
        template: str | None = None,
        prompt: str | None = None,
        query_max_len: int | None = None,
        passage_max_len: int | None = None,
        passage_prefix: str | None = None,
        batch_size: int = 64,
        max_tokens: int | None = 16384,
        padding_side: str = "right",
        output_dtype: str = "float32",
        show_progress: bool = False,
        tokenize_block: int = 8192,
    ):
        m = model.manifest
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.template = template or m.get("template", "none")
        self.prompt = prompt if prompt is not None else m.get("prompt")
        self.query_max_len = query_max_len or m.get("query_max_len", 512)
        self.passage_max_len = passage_max_len or m.get("passage_max_len", 512)
        self.passage_prefix = passage_prefix if passage_prefix is not None else m.get("passage_prefix", "")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.padding_side = padding_side
        if output_dtype not in ("float32", "float16"):
            raise ValueError(f"output_dtype must be float32 or float16, got {output_dtype!r}")
        self.output_dtype = np.float32 if output_dtype == "float32" else np.float16
        self.show_progress = show_progress
        self.tokenize_block = tokenize_block

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------- text -> ids
    def query_ids(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        examples: Sequence[ICLExample] | None = None,
    ) -> list[list[int]]:
        """Token ids exactly as the training collator builds them (template, cut before the suffix, EOS)."""
        prompt = instruction if instruction is not None else self.prompt
        if self.template in ("bge-icl", "bge-icl-special", "e5-mistral", "qwen3-embedding") and prompt is None:
            raise UserError(f"template {self.template!r} needs an instruction: pass instruction=... or save one in the manifest")
        ex = [tuple(examples or ())] * len(texts)
        formatted, _ = fit_queries(self.tokenizer, self.template, [prompt] * len(texts), list(texts), self.query_max_len, ex)
        return tokenize_with_eos(self.tokenizer, formatted, self.query_max_len)

    def passage_ids(self, texts: Sequence[str]) -> list[list[int]]:
        formatted = [format_passage(self.template, t, self.passage_prefix) for t in texts]
        return tokenize_with_eos(self.tokenizer, formatted, self.passage_max_len)

    # ----------------------------------------------------------- ids -> vecs
    def batches(self, lengths: Sequence[int], batch_size: int | None = None, max_tokens: int | None = None) -> list[list[int]]:
        """Indices grouped longest-first into batches of <= batch_size rows and <= max_tokens padded tokens."""
        batch_size = batch_size or self.batch_size
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        out, current = [], []
        for i in order:
            longest = lengths[current[0]] if current else lengths[i]
            if current and (len(current) >= batch_size or (max_tokens and (len(current) + 1) * longest > max_tokens)):
                out.append(current)
                current = []
            current.append(i)
        if current:
            out.append(current)
        return out

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None, desc: str = "encode") -> np.ndarray:
        """Embeddings (n, D) in input order."""
        if len(ids) == 0:
            raise DataError("nothing to encode: the input is empty")
        was_training = self.model.training
        self.model.eval()
        pad_id = special_tokens(self.tokenizer).pad_id
        batches = self.batches([len(x) for x in ids], batch_size)
        out: np.ndarray | None = None
        device = self.device
        autocast = _autocast(device, next(self.model.parameters()).dtype)
        progress = None
        if self.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(ids), desc=desc, unit="text", leave=False)
        try:
            for rows in batches:
                feats = pad_batch([ids[i] for i in rows], pad_id, self.padding_side)
                feats = {k: v.to(device, non_blocking=True) for k, v in feats.items()}
                with autocast:
                    reps = self.model.encode(feats)
                reps = reps.float().cpu().numpy()
                if out is None:
                    out = np.empty((len(ids), reps.shape[1]), dtype=self.output_dtype)
                out[rows] = reps
                if progress is not None:
                    progress.update(len(rows))
                if self.on_batch is not None:
                    self.on_batch(len(rows))
        finally:
            if progress is not None:
                progress.close()
            self.model.train(was_training)
        return out

    def encode_queries(self, texts: Sequence[str], instruction: str | None = None, batch_size: int | None = None,
                       examples: Sequence[ICLExample] | None = None) -> np.ndarray:
        return self._encode_blocks(lambda block: self.query_ids(block, instruction, examples), texts, batch_size, "queries")

    def encode_corpus(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        return self._encode_blocks(self.passage_ids, texts, batch_size, "passages")

    def _encode_blocks(self, to_ids, texts: Sequence[str], batch_size: int | None, desc: str) -> np.ndarray:
        """Tokenise block k + 1 in a thread while the model encodes block k.

        Blocks of ``tokenize_block`` texts; each is length-sorted on its own.  The
        Rust tokenizer releases the GIL, so the overlap is real.  Small inputs are
        one block (no thread).
        """
        if len(texts) == 0:
            raise DataError("nothing to encode: the input is empty")
        n = self.tokenize_block
        if len(texts) <= n:
            return self.encode_ids(to_ids(list(texts)), batch_size, desc=desc)
        from concurrent.futures import ThreadPoolExecutor

        blocks = [list(texts[i : i + n]) for i in range(0, len(texts), n)]
        parts = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(to_ids, blocks[0])
            for k in range(len(blocks)):
                ids = pending.result()
                if k + 1 < len(blocks):
                    pending = pool.submit(to_ids, blocks[k + 1])
                parts.append(self.encode_ids(ids, batch_size, desc=f"{desc} {k + 1}/{len(blocks)}"))
        return np.concatenate(parts, axis=0)


def _autocast(device: torch.device, param_dtype: torch.dtype):
    """bf16 autocast on GPU for fp32 weights; nothing on CPU (bf16 matmul is slow there)."""
    import contextlib

    if device.type == "cuda" and param_dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_encoder(
    path: str | os.PathLike,
    device: str | None = None,
    *,
    preset: str | None = None,
    dtype: str | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    **encoder_kwargs,
) -> Encoder:
    """A denselm output folder, or a plain transformers embedder with ``preset`` (see PRESETS)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"model folder {path} does not exist")
    device = device or default_device()
    torch_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if torch_dtype is None and device.startswith("cuda"):
        torch_dtype = torch.bfloat16
    if (path / MANIFEST_NAME).exists():
        model = BiEncoderModel.load(path, base_model=base_model, torch_dtype=torch_dtype, device=device)
        return Encoder(model, show_progress=show_progress, **encoder_kwargs)
    if preset is None:
        raise UserError(
            f"{path} has no {MANIFEST_NAME} (not trained by denselm); pass a preset for a known embedder: "
            f"{', '.join(PRESETS)}"
        )
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    from transformers import AutoModel, AutoTokenizer

    p = PRESETS[preset]
    tokenizer = AutoTokenizer.from_pretrained(path)
    kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
    backbone = AutoModel.from_pretrained(path, **kw).to(device)
    model = BiEncoderModel(
        model=backbone, tokenizer=tokenizer, normalized=p.normalized, pooling=p.pooling,
        manifest={"template": p.template, "prompt": p.prompt, "query_max_len": p.query_max_len,
                  "passage_max_len": p.passage_max_len},
    ).eval()
    return Encoder(model, show_progress=show_progress, **encoder_kwargs)
