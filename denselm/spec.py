"""The embedding spec: everything that turns a text into a vector, saved with the model.

    denselm info out/model                       # the resolved spec of a model folder, as JSON
    spec = read_manifest("out/model").spec     # EmbeddingSpec
    spec = spec_from_config(cfg, added_tokens)  # what train builds the model with

One frozen dataclass, ``EmbeddingSpec``, holds the backbone (base model, number of layers, added
tokens), the text format (template, query instruction, passage prefix, max lengths) and the
embedding head (pooling, normalisation, position policy, packing).  It is built from the config in
one function (``spec_from_config``), taken whole by ``BiEncoderModel``, ``inference.Encoder``,
evaluation and export, and written to ``denselm.json`` next to the weights.  Its field defaults
are THE defaults: the config dataclasses read theirs from ``DEFAULT_SPEC``.

``denselm.json`` (version 3) is flat: ``format``, ``version``, every spec field, and what ``save``
records beside it: ``adapter`` (weights are a LoRA adapter), ``architecture``, ``eos_policy``
(derived from the tokenizer, for other tools) and ``temperature``, a training-only setting kept
for reference (it never changes a vector).  Version 2 had no ``query_cut``: such files load with
``retokenize``, the way they were trained.  Version 1 (no ``version``, or ``version: 1``) is the
format before this module; it still loads, keys it lacks mean the ``plain`` preset's values (what
``inference.Encoder`` assumed then).  A newer version is refused naming both versions.

Base model of a LoRA adapter: ``save`` records what works on another machine (``record_base_model``):
a hub id (also for a hub cache snapshot folder), a path relative to the model folder when the base
is inside it, an absolute path otherwise; ``--base-model`` (``base_model=``) overrides it at load.

This module itself imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EnvironmentProblem, UserError

MANIFEST_NAME = "denselm.json"
SPEC_VERSION = 3
"""Format version written to ``denselm.json``; 1 = the format before the typed spec, 2 = before ``query_cut``."""
TEMPLATE_NAMES = ("bge-icl", "bge-icl-special", "e5-mistral", "qwen3-embedding", "none")
POOLINGS = ("last", "mean", "first")
POSITION_POLICIES = ("end_aligned", "from_zero")
QUERY_CUTS = ("token", "retokenize")
RECORD_KEYS = ("format", "version", "adapter", "architecture", "eos_policy", "temperature")
"""Keys ``save`` writes beside the spec fields (derived or training-only)."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """What turns a text into a vector.  Defaults are the project's defaults (configs read them here)."""

    base_model: str | None = None
    """The backbone: a hub id or a local folder (in denselm.json: relative to the model folder when inside it)."""
    num_layers: int | None = None
    """Only the first N transformer layers (None = all)."""
    added_tokens: tuple[str, ...] = ()
    """Tokens added to the tokenizer for the template (their embedding rows are trained)."""
    template: str = "e5-mistral"
    """Query format preset: bge-icl, bge-icl-special, e5-mistral, qwen3-embedding or none.  The default
    (``Instruct: {prompt}\nQuery: {text}``) has no suffix, so every stack that knows prefix prompts only
    (TEI, vLLM, LangChain) reproduces it; it cost nothing against bge-icl on the demo recipe (README)."""
    prompt: str | None = None
    """The query instruction used when a caller gives none."""
    passage_prefix: str = ""
    """Text put in front of every passage."""
    query_max_len: int = 64
    """Maximum query tokens, BOS and EOS included."""
    passage_max_len: int = 256
    """Maximum passage tokens, BOS and EOS included."""
    query_cut: str = "token"
    """How a query too long for a template with a suffix (bge-icl) is cut: ``token`` keeps the first
    tokens and writes the suffix's ids after them (what sentence-transformers' ``restore_suffix``
    does, so exports reproduce it); ``retokenize`` decodes the kept tokens and tokenizes them again
    with the suffix (the seed's way; models saved before version 3)."""
    pooling: str = "last"
    """last (the EOS we append), mean or first."""
    normalized: bool = True
    """L2-normalise embeddings."""
    position_ids: str = "from_zero"
    """from_zero (positions start at 0 per text: batch-independent; the default, it cost nothing on the
    demo recipe) or end_aligned (the seed's numbers, any padding side)."""
    packing: bool = False
    """Padding-free encoding (exact; implies from_zero positions)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "added_tokens", tuple(self.added_tokens or ()))
        if self.template not in TEMPLATE_NAMES:
            raise UserError(f"template must be one of {', '.join(TEMPLATE_NAMES)}; got {self.template!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.query_cut not in QUERY_CUTS:
            raise UserError(f"query_cut must be one of {QUERY_CUTS}, got {self.query_cut!r}")
        if self.position_ids not in POSITION_POLICIES:
            raise UserError(f"position_ids must be one of {POSITION_POLICIES}, got {self.position_ids!r}")
        for name in ("query_max_len", "passage_max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_layers is not None and (isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int)
                                            or self.num_layers < 1):
            raise UserError(f"num_layers must be an integer >= 1 or null, got {self.num_layers!r}")
        for name in ("normalized", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise UserError(f"prompt must be a string or null, got {self.prompt!r}")
        if not isinstance(self.passage_prefix, str):
            raise UserError(f"passage_prefix must be a string, got {self.passage_prefix!r}")
        if not all(isinstance(t, str) for t in self.added_tokens):
            raise UserError(f"added_tokens must be a list of strings, got {list(self.added_tokens)!r}")
        if self.packing and self.position_ids != "from_zero":
            # Packed rows restart positions at 0 per sequence; the padded path must agree.
            object.__setattr__(self, "position_ids", "from_zero")

    def replace(self, **changes: Any) -> "EmbeddingSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["added_tokens"] = list(self.added_tokens)
        return out

    @classmethod
    def from_dict(cls, values: dict, fallback: "EmbeddingSpec | None" = None) -> "EmbeddingSpec":
        """The spec fields of ``values`` over ``fallback`` (default: the field defaults); other keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        if known.get("added_tokens") is None:
            known.pop("added_tokens", None)
        return dataclasses.replace(fallback, **known) if fallback is not None else cls(**known)


DEFAULT_SPEC = EmbeddingSpec()
"""The defaults, read by ``config.ModelConfig`` and ``data.config.DataConfig``."""

_WEB_SEARCH = "Given a web search query, retrieve relevant passages that answer the query"
PLAIN = EmbeddingSpec(template="none", query_max_len=512, passage_max_len=512, position_ids="end_aligned")
"""A model with no recorded text format: plain text, 512 tokens, the positions transformers gives a
left-padded batch (also what version-1 files lacked, and what the seed's ``BiEncoderModel`` arguments give)."""
PRESETS: dict[str, EmbeddingSpec] = {
    "bge-en-icl": PLAIN.replace(template="bge-icl", prompt=_WEB_SEARCH + "."),
    "e5-mistral": PLAIN.replace(template="e5-mistral", prompt=_WEB_SEARCH),
    "qwen3-embedding": PLAIN.replace(template="qwen3-embedding", prompt=_WEB_SEARCH),
    "plain": PLAIN,
}
"""Specs of plain transformers embedders (folders without denselm.json): ``--preset NAME``."""


def spec_from_config(cfg, added_tokens=()) -> EmbeddingSpec:
    """The spec a training run with config ``cfg`` embeds with (``cfg``: a ``denselm.config.Config``)."""
    name = cfg.model.name_or_path or None
    if name and Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return EmbeddingSpec(
        base_model=name,
        num_layers=cfg.model.num_layers,
        added_tokens=tuple(added_tokens),
        template=cfg.data.template,
        # Inference's default query instruction: the global one, else the one evaluation used
        # (data with per-line prompts has no global one).
        prompt=cfg.data.prompt if cfg.data.prompt is not None else cfg.eval.query_instruction,
        passage_prefix=cfg.data.passage_prefix,
        query_max_len=cfg.data.query_max_len,
        passage_max_len=cfg.data.passage_max_len,
        query_cut=cfg.data.query_cut,
        pooling=cfg.model.pooling,
        normalized=cfg.model.normalized,
        position_ids=cfg.model.position_ids,
        packing=cfg.model.packing,
    )


# ------------------------------------------------------------------ base model
_HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def record_base_model(base_model: str | None, model_folder: str | os.PathLike) -> str | None:
    """What ``denselm.json`` records for the base: a hub id when known (a hub cache snapshot folder
    counts), the path relative to ``model_folder`` when the base is inside it, else absolute."""
    if not base_model:
        return None
    local = Path(base_model).expanduser()
    if not local.exists():
        return base_model  # a hub id (or a path that is gone): keep what we were given
    local = local.resolve()
    hub = _HUB_SNAPSHOT.search(local.as_posix())
    if hub:
        return f"{hub['org']}/{hub['name']}"
    try:
        return local.relative_to(Path(model_folder).resolve()).as_posix()
    except ValueError:
        return str(local)


def resolve_base_model(recorded: str | None, model_folder: str | os.PathLike) -> str | None:
    """The recorded base as a path to load: relative paths are relative to ``model_folder``."""
    if not recorded:
        return None
    path = Path(recorded).expanduser()
    if not path.is_absolute() and (Path(model_folder) / path).exists():
        return str((Path(model_folder) / path).resolve())
    return str(path) if path.exists() else recorded


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` (not a path that starts with /, ., ~ or has more parts)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value)) and not value.startswith((".", "~"))


class BaseModelNotFound(EnvironmentProblem, FileNotFoundError):
    """A LoRA folder whose base model is not on this machine."""

    def __init__(self, folder, recorded: str | None, given: str | None = None):
        where = (f"--base-model {given!r} does not exist" if given else
                 f"its base model {recorded!r} (recorded in {MANIFEST_NAME}) is not on this machine"
                 if recorded else f"{MANIFEST_NAME} records no base model")
        super().__init__(
            f"{folder} holds a LoRA adapter and {where}; pass --base-model FOLDER_OR_HUB_ID "
            "(Python: base_model=...), or use a merged export (denselm export --format merged)"
        )


# ------------------------------------------------------------------ denselm.json
@dataclass(frozen=True)
class Manifest:
    """A parsed ``denselm.json``: the spec plus what ``save`` records beside it."""

    spec: EmbeddingSpec
    version: int = SPEC_VERSION
    """The file's format version (1 = before the typed spec)."""
    adapter: bool = False
    """The weights are a LoRA adapter on ``spec.base_model``."""
    temperature: float | None = None
    """Training-only: the contrastive temperature the model was trained with (never changes a vector)."""
    extra: dict = dataclasses.field(default_factory=dict)
    """Every other key (architecture, eos_policy, keys written by other tools)."""


def manifest_dict(spec: EmbeddingSpec, model_folder: str | os.PathLike, **record: Any) -> dict:
    """The ``denselm.json`` content: format, version, spec fields (base model made portable), ``record``."""
    out = {"format": "denselm", "version": SPEC_VERSION, **spec.to_dict()}
    out["base_model"] = record_base_model(spec.base_model, model_folder)
    out.update(record)
    return out


def parse_manifest(values: dict, source: str = MANIFEST_NAME) -> Manifest:
    """A ``denselm.json`` dict of any known version -> Manifest; UserError naming ``source`` otherwise."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(values).__name__}")
    if values.get("format", "denselm") != "denselm":
        raise UserError(f"{source}: 'format' is {values['format']!r}, not a denselm model manifest")
    version = values.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{source}: 'version' must be a positive integer, got {version!r}")
    if version > SPEC_VERSION:
        raise UserError(
            f"{source} has format version {version}, but this denselm reads versions up to {SPEC_VERSION}: "
            "the model was saved by a newer denselm; upgrade denselm (pip install -U denselm)"
        )
    # Versions 1 and 2 cut long suffix-template queries the seed's way (``query_cut`` came in 3).
    fallback = PLAIN if version >= 3 else PLAIN.replace(query_cut="retokenize")
    try:
        spec = EmbeddingSpec.from_dict(values, fallback=fallback)
    except (UserError, TypeError) as err:
        raise UserError(f"{source}: {err}") from None
    names = {f.name for f in dataclasses.fields(EmbeddingSpec)}
    extra = {k: v for k, v in values.items() if k not in names and k not in ("format", "version", "adapter", "temperature")}
    temperature = values.get("temperature")
    return Manifest(spec=spec, version=version, adapter=bool(values.get("adapter", False)),
                    temperature=float(temperature) if temperature is not None else None, extra=extra)


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Parse ``folder/denselm.json``; relative base-model paths stay as recorded (see ``resolve_base_model``)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a denselm model folder")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    return parse_manifest(values, str(path))


def describe(folder: str | os.PathLike, preset: str | None = None) -> dict:
    """What ``denselm info`` prints: the resolved spec of a model folder (or of a preset)."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).exists():
        m = read_manifest(folder)
        spec = m.spec.to_dict()
        spec["base_model"] = resolve_base_model(m.spec.base_model, folder)
        return {"folder": str(folder), "source": MANIFEST_NAME, "version": m.version, "spec": spec,
                "adapter": m.adapter, "training_only": {"temperature": m.temperature}, "recorded": m.extra}
    if preset is None:
        raise UserError(f"{folder} has no {MANIFEST_NAME} (not trained by denselm); pass --preset "
                        f"({', '.join(PRESETS)}) to see what a plain embedder would use")
    if preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
    return {"folder": str(folder), "source": f"preset {preset}", "version": SPEC_VERSION,
            "spec": PRESETS[preset].replace(base_model=str(folder)).to_dict(), "adapter": False, "training_only": {},
            "recorded": {}}


# ------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("model", help="denselm model folder (or a plain folder with --preset)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="the spec a plain transformers folder without denselm.json gets")


def run(args) -> int:
    print(json.dumps(describe(args.model, args.preset), indent=2))
    return 0
