"""Encoding text at inference: the same formatting and tokenisation as training, batched fast.

    import denselm
    enc = denselm.load("out/model")                     # = denselm.load_encoder; LoRA or merged folder
    q = enc.encode_queries(["how do I sort a dict?"])   # (n, D) float32 numpy
    d = enc.encode_corpus([{"title": "dict", "text": "Use sorted(d.items()) ..."}, "plain text"])
    scores = enc.similarity(q, d)                       # (n, m): the score the model was trained with

Argument names follow sentence-transformers / FlagEmbedding (``batch_size``,
``show_progress_bar``, ``normalize_embeddings``, ``convert_to_tensor``,
``convert_to_numpy``, ``prompt``), and ``encode_query`` / ``encode_document`` /
``encode`` are there for code written against sentence-transformers 5+.

Texts are sorted by length and cut into batches bounded by a row count and a
token budget, so padding stays small; results come back in input order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from .errors import DataError, InputNotFound, UserError
from .data.templates import ICLExample, fit_query_ids, format_passage
from .data.tokenize import pad_batch, special_tokens, tokenize_with_eos
from .model.encoder import BiEncoderModel
from .model.speedups.common import cpu_flags
from .spec import MANIFEST_NAME, PLAIN, PRESETS, EmbeddingSpec

logger = logging.getLogger(__name__)

__all__ = ["Encoder", "load_encoder", "PRESETS", "MANIFEST_NAME"]


Document = Union[str, Mapping[str, Any]]
"""A corpus entry: a plain string, or a BEIR-style dict with ``text`` and an optional ``title``."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def document_text(doc: Document) -> str:
    """The string a corpus entry is encoded as: ``"title text"`` as ``denselm encode`` and ``evaluate`` do."""
    from .beir import format_document

    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping):
        if "text" not in doc:
            raise ValueError(f"a corpus dict needs a 'text' key, got keys {sorted(doc)}")
        return format_document(str(doc.get("title") or ""), str(doc["text"]))
    raise TypeError(f"a corpus entry must be a str or a dict with 'text' (and 'title'), got {type(doc).__name__}")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """``dtype="auto"``: bf16 on GPU and on CPUs with bf16 matrix units, else float32.

    On this project's CPU (AMX-BF16) bf16 encoding of SmolLM2-135M ran about 3x faster than
    float32 (one thread, CPU time: seed-sorted batches 1,300-1,690 vs 440 real tok/s); bf16
    embeddings are within cosine 0.9989 of fp32 (benchmarks/RESULTS.md).  The default of
    ``denselm encode`` and ``denselm mine``: on the demo model bf16 gave pyfaq nDCG@10 0.6685 vs
    0.6655 in fp32 (benchmarks/dtype_quality.py).  The Python API keeps float32 on CPU unless asked."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.device(device).type == "cpu" and cpu_has_bf16_matmul() else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def encode_defaults(device: torch.device | str, dtype: torch.dtype, config=None) -> dict:
    """Encoding defaults for a device, weight dtype and backbone config.

    Measured on SmolLM2-135M, 2 CPU threads, bf16 and fp32 (benchmarks/encode_bench.py;
    tables in benchmarks/RESULTS.md, "Encoding on the real model"):
    - CPU: packing on.  Packed rows hold no padding and attend per sequence with SDPA's
      causal fast path (no mask); padded batches pay for their pads and for a masked SDPA.
    - CPU: rows of ``cpu_row_tokens`` tokens (2048 for SmolLM2 in bf16, 1024 in fp32), not
      the GPU's 4096.  What decides it is the size of the biggest activation, (T,
      intermediate_size): above ~24 MiB every fresh tensor is a new mmap whose pages the
      kernel faults in and zeroes, and element-wise ops ran 2.5-3.5x slower per element
      (silu * up: bf16 1.0-1.2 ns/element up to 12 MiB, 3.1 ns at 24 MiB; fp32 1.2 -> 4.3 ns),
      and bf16 matmul output at 16k tokens fell from 1,340 to 570 GFLOP/s.  With bf16
      matrix units (AMX) the matmuls are so fast that these element-wise passes decide the speed.
    - GPU: unchanged (padded, length-sorted, 64 rows / 16k tokens; packing where the config says).
    ``batch_size`` / ``max_tokens`` bound the length-sorted batches before packing.
    """
    on_cpu = torch.device(device).type == "cpu"
    out = {"packing": on_cpu, "batch_size": 64, "max_tokens": 16384, "packing_max_tokens": 4096}
    if on_cpu:
        out["packing_max_tokens"] = cpu_row_tokens(config, dtype)
    return out


CPU_ROW_BYTES = 8 << 20
"""Bytes of the widest (T, intermediate_size) activation of one packed row on CPU (see encode_defaults)."""


def cpu_row_tokens(config, dtype: torch.dtype) -> int:
    """Tokens per packed row on CPU: the widest activation within CPU_ROW_BYTES, a power of two in [512, 4096]."""
    width = max(getattr(config, "intermediate_size", 0) or 0, getattr(config, "hidden_size", 0) or 0) or 2048
    fit = CPU_ROW_BYTES // (width * torch.tensor([], dtype=dtype).element_size())
    tokens = 512
    while tokens * 2 <= min(fit, 4096):
        tokens *= 2
    return tokens


class Encoder:
    """Encodes queries and passages with a BiEncoderModel, formatted by its spec (``model.spec``).

    ``template``, ``prompt``, ``query_max_len``, ``passage_max_len``, ``passage_prefix``: override
    those spec fields for this encoder (None = the model's); ``encoder.spec`` is the result.
    """

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
        packing: bool | None = None,
        packing_max_tokens: int | None = None,
        padding_side: str = "right",
        output_dtype: str = "float32",
        show_progress: bool = False,
        tokenize_block: int = 8192,
    ):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        overrides = {"template": template or None, "prompt": prompt, "query_max_len": query_max_len or None,
                     "passage_max_len": passage_max_len or None, "passage_prefix": passage_prefix}
        spec = getattr(model, "spec", None)
        if spec is None:  # a model-like object with only a (pre-spec) manifest dict
            spec = EmbeddingSpec.from_dict(getattr(model, "manifest", None) or {}, fallback=PLAIN)
        self.spec: EmbeddingSpec = spec.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.packing = packing
        """None: ``encode_defaults`` for the model's device and dtype (packed on CPU when exact:
        RoPE or from_zero positions, no frozen-layer cache); True/False force it."""
        self.packing_max_tokens = packing_max_tokens
        self.padding_side = padding_side
        if output_dtype not in ("float32", "float16"):
            raise ValueError(f"output_dtype must be float32 or float16, got {output_dtype!r}")
        self.output_dtype = np.float32 if output_dtype == "float32" else np.float16
        self.show_progress = show_progress
        self.tokenize_block = tokenize_block

    # The text-format fields under their historical names (read by encode and serve); setting one
    # replaces this encoder's spec (a copy of the encoder can lift its limits without touching the original).
    def _set(self, name: str, value) -> None:
        self.spec = self.spec.replace(**{name: value})

    template = property(lambda self: self.spec.template, lambda self, v: self._set("template", v))
    prompt = property(lambda self: self.spec.prompt, lambda self, v: self._set("prompt", v))
    query_max_len = property(lambda self: self.spec.query_max_len, lambda self, v: self._set("query_max_len", v))
    passage_max_len = property(lambda self: self.spec.passage_max_len,
                               lambda self, v: self._set("passage_max_len", v))
    passage_prefix = property(lambda self: self.spec.passage_prefix, lambda self, v: self._set("passage_prefix", v))

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
        ids, _ = fit_query_ids(self.tokenizer, self.template, [prompt] * len(texts), list(texts), self.query_max_len,
                               ex, cut=self.spec.query_cut)
        return ids

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
    def encode_batch(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """One forward pass: id lists (each ending in EOS) -> (B, D) float32 on the CPU.

        The model must be in eval mode; ``encode_ids`` and the server's worker call this, so
        both produce the same numbers for the same batch."""
        feats = pad_batch(list(rows), special_tokens(self.tokenizer).pad_id, self.padding_side)  # (B, T)
        device = self.device
        feats = {k: v.to(device, non_blocking=True) for k, v in feats.items()}
        with _autocast(device, next(self.model.parameters()).dtype), self._packing_scope():
            reps = self.model.encode(feats)  # (B, D)
        return reps.float().cpu()

    def packing_settings(self) -> tuple[bool, int | None]:
        """(packed?, tokens per packed row) this encoder uses for its model, device and dtype."""
        model = self.model
        config = getattr(model._backbone(), "config", None)
        defaults = encode_defaults(self.device, next(model.parameters()).dtype, config)
        if self.packing is not None:
            packing = self.packing
        elif model.packing:
            packing = True  # the model was trained (and saved) packed
        else:
            # Packed positions restart at 0 per sequence: the same numbers as the padded
            # path for the from_zero policy, and for any policy under rotary embeddings.
            rotary = config is not None and (getattr(config, "rope_parameters", None) is not None
                                             or getattr(config, "rope_theta", None) is not None)
            exact = model.position_policy == "from_zero" or rotary
            packing = defaults["packing"] and exact and model.prefix_cache is None
        tokens = self.packing_max_tokens or (defaults["packing_max_tokens"] if self.packing is None else None)
        return packing, tokens or model.packing_max_tokens

    def _packing_scope(self):
        """The model's ``packing`` / ``packing_max_tokens`` set to ``packing_settings`` for one call."""
        import contextlib

        from .model.speedups import packing as packing_lib
        from .model.speedups.common import swapped

        packing, tokens = self.packing_settings()
        if packing == self.model.packing and tokens == self.model.packing_max_tokens:
            return contextlib.nullcontext()
        if packing:
            packing_lib.enable(self.model._backbone())
        stack = contextlib.ExitStack()
        spec = self.model.spec
        if packing != spec.packing:
            # Packed rows restart positions at 0: only chosen where that gives the same numbers.
            spec = spec.replace(packing=packing, position_ids="from_zero") if packing else spec.replace(packing=False)
        stack.enter_context(swapped(self.model, "spec", spec))
        stack.enter_context(swapped(self.model, "packing_max_tokens", tokens))
        return stack

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None, desc: str = "encode",
                   show_progress: bool | None = None) -> np.ndarray:
        """Embeddings (n, D) in input order."""
        if len(ids) == 0:
            raise DataError("nothing to encode: the input is empty")
        was_training = self.model.training
        self.model.eval()
        batches = self.batches([len(x) for x in ids], batch_size)
        out: np.ndarray | None = None
        progress = None
        if self.show_progress if show_progress is None else show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(ids), desc=desc, unit="text", leave=False)
        try:
            for rows in batches:
                reps = self.encode_batch([ids[i] for i in rows]).numpy()
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

    # ------------------------------------------------------ the public API
    def encode_queries(
        self,
        queries: str | Sequence[str],
        batch_size: int | None = None,
        *,
        prompt: str | None = None,
        instruction: str | None = None,
        examples: Sequence[ICLExample] | None = None,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_tensor: bool = False,
        convert_to_numpy: bool = True,
    ):
        """Query embeddings: each query formatted with the template and instruction the model was trained with.

        ``prompt`` (or its alias ``instruction``) replaces the saved instruction; the template's
        other parts (and a suffix such as ``\nResponse:``) stay.  Returns (n, D) numpy by default,
        (D,) for a single string; see ``_convert`` for the ``convert_to_*`` flags.
        """
        if prompt is not None and instruction is not None and prompt != instruction:
            raise ValueError("pass prompt= or instruction= (the same thing), not two different values")
        prompt = prompt if prompt is not None else instruction
        single, texts = _as_list(queries, "queries")
        emb = self._encode_blocks(lambda block: self.query_ids(block, prompt, examples), texts, batch_size,
                                  "queries", show_progress_bar)
        return self._convert(emb, single, normalize_embeddings, convert_to_tensor, convert_to_numpy)

    def encode_corpus(
        self,
        corpus: Document | Sequence[Document],
        batch_size: int | None = None,
        *,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_tensor: bool = False,
        convert_to_numpy: bool = True,
    ):
        """Passage embeddings.  Entries are strings or dicts with ``text`` and optional ``title``
        (encoded as ``"title text"``, as ``denselm encode`` does); they can be mixed."""
        single, docs = _as_list(corpus, "corpus")
        texts = [document_text(d) for d in docs]
        emb = self._encode_blocks(self.passage_ids, texts, batch_size, "passages", show_progress_bar)
        return self._convert(emb, single, normalize_embeddings, convert_to_tensor, convert_to_numpy)

    def encode_query(self, sentences: str | Sequence[str], **kwargs):
        """sentence-transformers 5+ name of ``encode_queries``."""
        return self.encode_queries(sentences, **kwargs)

    def encode_document(self, sentences: Document | Sequence[Document], **kwargs):
        """sentence-transformers 5+ name of ``encode_corpus``."""
        return self.encode_corpus(sentences, **kwargs)

    def encode(self, sentences, batch_size: int | None = None, *, input_type: str = "document",
               prompt: str | None = None, **kwargs):
        """``encode_corpus`` (default) or ``encode_queries`` (``input_type="query"``, or any ``prompt``).

        As in sentence-transformers, a ``prompt`` marks the texts as queries; unlike it, the
        prompt is the instruction placed in the model's template, not a bare prefix."""
        if input_type not in ("query", "document"):
            raise ValueError(f"input_type must be 'query' or 'document', got {input_type!r}")
        if input_type == "query" or prompt is not None:
            return self.encode_queries(sentences, batch_size, prompt=prompt, **kwargs)
        return self.encode_corpus(sentences, batch_size, **kwargs)

    @staticmethod
    def similarity(a, b):
        """(n, m) scores between two sets of embeddings: the inner product the model was trained
        with (cosine for a normalised model).  numpy in -> numpy out; a tensor in -> a tensor."""
        as_numpy = not (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor))
        ta, tb = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in (a, b))
        ta = (ta.unsqueeze(0) if ta.dim() == 1 else ta).float()  # (n, D)
        tb = (tb.unsqueeze(0) if tb.dim() == 1 else tb).float().to(ta.device)  # (m, D)
        scores = ta @ tb.T  # (n, m)
        return scores.cpu().numpy() if as_numpy else scores

    def _convert(self, emb: np.ndarray, single: bool, normalize: bool, to_tensor: bool, to_numpy: bool):
        """numpy (n, D) -> what sentence-transformers would return for these flags.

        ``convert_to_tensor`` wins: one tensor on the model's device; ``convert_to_numpy=False``
        without it: a list of (D,) tensors.  A single input string gives (D,)."""
        if normalize:
            norms = np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True)
            emb = (emb / np.maximum(norms, 1e-12)).astype(emb.dtype)
        if to_tensor:
            out = torch.from_numpy(emb).to(self.device)
            return out[0] if single else out
        if not to_numpy:
            rows = [torch.from_numpy(row).to(self.device) for row in emb]
            return rows[0] if single else rows
        return emb[0] if single else emb

    def _encode_blocks(self, to_ids, texts: Sequence[str], batch_size: int | None, desc: str,
                       show_progress: bool | None = None) -> np.ndarray:
        """Tokenise block k + 1 in a thread while the model encodes block k.

        Blocks of ``tokenize_block`` texts; each is length-sorted on its own.  The
        Rust tokenizer releases the GIL, so the overlap is real.  Small inputs are
        one block (no thread).
        """
        if len(texts) == 0:
            raise DataError("nothing to encode: the input is empty")
        n = self.tokenize_block
        if len(texts) <= n:
            return self.encode_ids(to_ids(list(texts)), batch_size, desc=desc, show_progress=show_progress)
        from concurrent.futures import ThreadPoolExecutor

        blocks = [list(texts[i : i + n]) for i in range(0, len(texts), n)]
        parts = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(to_ids, blocks[0])
            for k in range(len(blocks)):
                ids = pending.result()
                if k + 1 < len(blocks):
                    pending = pool.submit(to_ids, blocks[k + 1])
                parts.append(self.encode_ids(ids, batch_size, desc=f"{desc} {k + 1}/{len(blocks)}",
                                             show_progress=show_progress))
        return np.concatenate(parts, axis=0)


def _as_list(texts, what: str) -> tuple[bool, list]:
    """(was it one item, the items as a list): a bare str (or dict) is one text, as in sentence-transformers."""
    if isinstance(texts, (str, Mapping)):
        return True, [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError(f"{what} must be str, not bytes: decode it first")
    return False, list(texts)


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
    dtype: str | torch.dtype | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    **encoder_kwargs,
) -> Encoder:
    """A denselm output folder, or a plain transformers embedder with ``preset`` (see PRESETS).

    ``dtype``: the weights' dtype ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16", a
    torch dtype, or "auto": ``auto_dtype``; default (None) bfloat16 on GPU, float32 on CPU).  ``encoder_kwargs`` go to ``Encoder``
    (``prompt=`` replaces the saved instruction for every call, ``batch_size``, ``max_tokens``...).
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"model folder {path} does not exist")
    device = str(device or default_device())
    if dtype is None or isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype == "auto":
        torch_dtype = auto_dtype(device)
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise UserError(f"dtype must be auto or one of {', '.join(DTYPES)} (or a torch dtype), got {dtype!r}")
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

    tokenizer = AutoTokenizer.from_pretrained(path)
    kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
    backbone = AutoModel.from_pretrained(path, **kw).to(device)
    spec = PRESETS[preset].replace(base_model=str(path.resolve()))
    model = BiEncoderModel(model=backbone, tokenizer=tokenizer, spec=spec).eval()
    return Encoder(model, show_progress=show_progress, **encoder_kwargs)
