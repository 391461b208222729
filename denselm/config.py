"""Typed configuration: a YAML file plus dotted command-line overrides.

    denselm train configs/tiny.yaml --train.lr 2e-4 --model.lora.r 8

Each section is a dataclass whose fields are documented by the line under
them.  Unknown keys, wrong types and bad values give a one-line error that
names the key (``train.lr``) or the YAML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import errors
from .data.config import DataConfig
from .model import speedups
from .spec import DEFAULT_SPEC, POOLINGS, POSITION_POLICIES

ConfigError = errors.ConfigError  # a bad key or value; the message names it

METRIC_RE = re.compile(r"^(ndcg|mrr|recall)@([1-9][0-9]*)$|^map$")
"""Names ``denselm.evaluate`` computes: ndcg@k, mrr@k, recall@k (k >= 1), map."""

NON_FINITE_OK: frozenset[str] = frozenset()
"""Float keys where inf/NaN means something (none yet): every other float must be finite."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters (peft) instead of every weight."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Modules to adapt; "all-linear" = every linear layer of attention and MLP."""
    top_layers: int | None = None
    """Adapt only the last N transformer layers: backward then stops below them (cheaper steps)."""

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"model.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """A transformers model folder (or hub name when online)."""
    dtype: str = "float32"
    """Dtype the frozen weights are loaded in: float32, bfloat16 or float16 (trainable ones stay float32)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, flash_attention_2 (when installed)."""
    pooling: str = DEFAULT_SPEC.pooling
    """Embedding: last (the EOS we append), mean or first."""
    normalized: bool = DEFAULT_SPEC.normalized
    """L2-normalise embeddings (cosine similarity)."""
    temperature: float = 0.02
    """Softmax temperature of the contrastive loss (reset to 1.0 when not normalized, as the seed)."""
    position_ids: str = DEFAULT_SPEC.position_ids
    """end_aligned (the seed's numbers, any padding side) or from_zero."""
    num_layers: int | None = DEFAULT_SPEC.num_layers
    """Keep only the first N transformer layers (a cheaper, often as good retriever)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant)."""
    packing: bool = DEFAULT_SPEC.packing
    """Padding-free batches: sequences packed into rows, attention never crosses them (implies from_zero positions)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"model.dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling must be last, mean or first, got {self.pooling!r}")
        if self.position_ids not in POSITION_POLICIES:
            raise ConfigError(f"model.position_ids must be end_aligned or from_zero, got {self.position_ids!r}")
        if self.temperature <= 0:
            raise ConfigError(f"model.temperature must be > 0, got {self.temperature}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"model.num_layers must be >= 1, got {self.num_layers}")


@dataclass
class LossConfig:
    negatives_cross_device: bool = True
    """Share in-batch negatives across processes (ignored on one process)."""
    teacher_temperature: float = 1.0
    """Teacher scores are divided by this before their softmax (0.02-0.05 for cosine teachers)."""
    distill_weight: float = 1.0
    """Weight of the distillation term (used when the data has pos_scores/neg_scores)."""
    distill_loss: str = "soft_ce"
    """soft_ce (the seed's) or kl."""
    distill_in_custom_mode: bool = False
    """Also distil on "custom"-mode batches (the seed ignores teacher scores there)."""
    sub_batch_size: int = -1
    """Encode in chunks of this many rows (the seed's option; saves no memory without checkpointing)."""
    grad_cache: bool = False
    """Gradient caching: memory-bounded large batches, same gradients."""
    grad_cache_chunk_size: int | None = None
    """Rows per gradient-cache chunk."""
    grad_cache_max_tokens: int | None = None
    """Padded tokens per gradient-cache chunk."""
    margin: float | None = None
    """Mask in-batch passages scoring above the positive + margin (similarity before the temperature;
    the Qwen3-Embedding rule uses 0.1); None = off. Applies to every term of the denominator."""
    teacher_margin: float | None = None
    """Mask own-group negatives the teacher scores above its positive + this (on the teacher's scale,
    needs pos_scores/neg_scores); None = off."""
    directions: list[str] = field(default_factory=lambda: ["query_to_doc"])
    """Terms of the InfoNCE denominator: query_to_doc (always) plus query_to_query, doc_to_query,
    doc_to_doc (all four = the GTE/Qwen3 loss); names as sentence-transformers' MNRL. "normal" batches only."""
    partition_mode: str = "joint"
    """joint (one softmax over all terms) or per_direction (one per term, averaged; query_to_doc/doc_to_query)."""
    hardness_mode: str | None = None
    """Hardness weighting of negatives (LLaVE): in_batch_negatives, hard_negatives, all_negatives; None = off."""
    hardness_strength: float = 0.0
    """alpha: negative j's softmax term is weighted by exp(alpha * s_ij), detached (LLaVE uses 9)."""
    embed_distill_teacher: str | None = None
    """Teacher for embedding distillation: a sentence-transformers folder or "minilm" (all-MiniLM-L6-v2, packaged)."""
    embed_distill_weight: float = 0.0
    """Weight of distance(projection(student), teacher) on query and passage embeddings (projection: checkpoints only)."""
    embed_distill_distance: str = "cosine"
    """cosine (1 - cos), mse or l2 (sentence-transformers' EmbedDistillLoss names)."""
    similarity_distill_weight: float = 0.0
    """Weight of matching the teacher's in-batch query-passage cosine similarity matrix (dimension-free)."""
    similarity_distill_kind: str = "mse"
    """mse: squared error on raw cosines; kl: KL between each query's softmax over the in-batch passages,
    the teacher's cosines at loss.teacher_temperature, the student's scores at model.temperature (listwise)."""
    embed_distill_max_length: int | None = None
    """Teacher tokens per text (None: the teacher's own limit, 256 for MiniLM); part of the cache key."""
    embed_distill_dtype: str = "float32"
    """The teacher's weights: float32, or bfloat16 (~2.5x faster on CPUs with bf16 matrix units; cosine to
    the float32 vectors >= 0.9999 for MiniLM). Part of the cache key: the two never share rows."""
    embed_distill_cache: str | None = None
    """SQLite file caching teacher embeddings by (teacher, text hash); None = ~/.cache/denselm/teacher-embeddings.sqlite."""

    def __post_init__(self):
        if self.distill_loss not in ("soft_ce", "kl"):
            raise ConfigError(f"loss.distill_loss must be soft_ce or kl, got {self.distill_loss!r}")
        if self.teacher_temperature <= 0:
            raise ConfigError(f"loss.teacher_temperature must be > 0, got {self.teacher_temperature}")
        from . import losses

        if self.margin is not None and self.margin < 0:
            raise ConfigError(f"loss.margin must be >= 0 (or null), got {self.margin}")
        bad = [d for d in self.directions if d not in losses.DIRECTIONS]
        if bad or "query_to_doc" not in self.directions:
            raise ConfigError(f"loss.directions must include query_to_doc and be among {list(losses.DIRECTIONS)}, "
                              f"got {self.directions}")
        if self.partition_mode not in losses.PARTITION_MODES:
            raise ConfigError(f"loss.partition_mode must be joint or per_direction, got {self.partition_mode!r}")
        if self.partition_mode == "per_direction" and set(self.directions) & {"query_to_query", "doc_to_doc"}:
            raise ConfigError("loss.partition_mode per_direction only works with loss.directions query_to_doc and "
                              "doc_to_query (the same-type terms never hold the positive)")
        if self.hardness_mode is not None and self.hardness_mode not in losses.HARDNESS_MODES:
            raise ConfigError(f"loss.hardness_mode must be one of {list(losses.HARDNESS_MODES)} or null, "
                              f"got {self.hardness_mode!r}")
        if self.hardness_strength < 0:
            raise ConfigError(f"loss.hardness_strength must be >= 0, got {self.hardness_strength}")
        for key in ("embed_distill_weight", "similarity_distill_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0, got {getattr(self, key)}")
        if self.embed_distill_distance not in losses.EMBED_DISTANCES:
            raise ConfigError(f"loss.embed_distill_distance must be one of {list(losses.EMBED_DISTANCES)}, "
                              f"got {self.embed_distill_distance!r}")
        if self.similarity_distill_kind not in losses.SIMILARITY_DISTILL_KINDS:
            raise ConfigError(f"loss.similarity_distill_kind must be one of {list(losses.SIMILARITY_DISTILL_KINDS)}, "
                              f"got {self.similarity_distill_kind!r}")
        if self.embed_distill_max_length is not None and self.embed_distill_max_length < 1:
            raise ConfigError(f"loss.embed_distill_max_length must be >= 1 (or null), got {self.embed_distill_max_length}")
        from .teacher_embeddings import TEACHER_DTYPES

        if self.embed_distill_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"loss.embed_distill_dtype must be one of {list(TEACHER_DTYPES)}, "
                              f"got {self.embed_distill_dtype!r}")
        if self.embeds_distilled and not self.embed_distill_teacher:
            raise ConfigError("loss.embed_distill_teacher is required when loss.embed_distill_weight or "
                              "loss.similarity_distill_weight is > 0 (e.g. minilm)")

    @property
    def embeds_distilled(self) -> bool:
        return self.embed_distill_weight > 0 or self.similarity_distill_weight > 0

    def options(self):
        """The ``losses.LossOptions`` the model's forward uses."""
        from . import losses

        return losses.LossOptions(self.margin, self.teacher_margin, tuple(self.directions), self.partition_mode,
                                  self.hardness_mode, self.hardness_strength)


@dataclass
class EvalConfig:
    data: str | None = None
    """BEIR-format folder evaluated during training (None = no evaluation)."""
    split: str = "test"
    """qrels split."""
    every: int = 0
    """Evaluate every N optimizer steps (0 = only at the end when data is set)."""
    metric: str = "ndcg@10"
    """Metric that picks the best checkpoint."""
    query_instruction: str | None = None
    """Instruction for evaluation queries (None = data.prompt)."""
    batch_size: int = 32
    """Encoding batch size during evaluation."""
    max_queries: int | None = None
    """Evaluate on the first N queries only (faster periodic evaluation)."""

    def __post_init__(self):
        # checked here, not at the first evaluation after training has started
        if not METRIC_RE.match(self.metric):
            close = difflib.get_close_matches(self.metric, ["ndcg@10", "mrr@10", "recall@10", "recall@100", "map"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"eval.metric must be ndcg@K, mrr@K, recall@K or map, got {self.metric!r}{hint}")
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class TrainConfig:
    output_dir: str = ""
    """Where checkpoints, logs and the final model go."""
    per_device_batch_size: int = 8
    """Queries per process per micro-batch (each with group_size passages)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. Adds no negatives: use loss.grad_cache for big contrastive batches."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_fraction: float = 0.05
    """Fraction of steps with linear warm-up."""
    scheduler: str = "linear"
    """After warm-up: linear, cosine or constant."""
    epochs: int = 1
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run."""
    max_minutes: float | None = None
    """Wall-clock budget of the training loop (this process's, from its first step): once a step ends past
    it, training stops there as if that were the last step (final evaluation, checkpoint and model saved).
    The learning-rate schedule stays the one of max_steps/epochs.  None = no limit."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping (None = off)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 autocast; trainable parameters and optimizer state stay fp32."""
    seed: int = 42
    """Seed of parameter init (LoRA) and dropout; data randomness uses data.seed."""
    log_every: int = 1
    """Log every N optimizer steps."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones deleted; the best one is kept too)."""
    merge_lora: bool = False
    """Also write a merged (plain transformers) model at the end."""
    strategy: str = "ddp"
    """Multi-process strategy: ddp or fsdp (FSDP2 fully_shard)."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (None = cuda when available)."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""
    cache_frozen_layers: bool = False
    """Compute the frozen layers below model.lora.top_layers once per distinct text and keep their output
    (exact; steps after the first pass run only the adapted layers). Needs from_zero positions or packing."""
    cache_max_gb: float = 8.0
    """Memory the frozen-layer cache may use (on the training device); texts beyond it are recomputed."""

    def __post_init__(self):
        if self.per_device_batch_size < 1:
            raise ConfigError(f"train.per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"train.warmup_fraction must be between 0 and 1, got {self.warmup_fraction}")
        if self.scheduler not in ("linear", "cosine", "constant"):
            raise ConfigError(f"train.scheduler must be linear, cosine or constant, got {self.scheduler!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"train.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float))
                                                 and not isinstance(self.max_minutes, bool) and self.max_minutes > 0):
            raise ConfigError(f"train.max_minutes must be a number > 0 or null, got {self.max_minutes!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone and how it embeds."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data, templates and sampling."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive and distillation settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""

    def __post_init__(self):
        # Which speed-ups combine with which settings: the one table in denselm.model.speedups.
        speedups.validate(self)
        if self.train.cache_frozen_layers and self.train.cache_max_gb <= 0:
            raise ConfigError(f"train.cache_max_gb must be > 0, got {self.train.cache_max_gb}")

    def validate_paths(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path is required")
        name = self.model.name_or_path
        looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).suffix != ""
        if looks_local and not Path(name).expanduser().exists():
            raise ConfigError(f"model.name_or_path: {name} does not exist")
        if not self.train.output_dir:
            raise ConfigError("train.output_dir is required")
        if not self.data.train_data:
            raise ConfigError("data.train_data is required")
        for p in self.data.train_data:
            if not Path(p).exists():
                raise ConfigError(f"data.train_data: {p} does not exist")
        if self.eval.data and not Path(self.eval.data).exists():
            raise ConfigError(f"eval.data: {self.eval.data} does not exist")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------- resume
RESUMABLE_KEYS: frozenset[str] = frozenset({
    # how long: the schedule is rebuilt from the new total (max_steps, else epochs)
    "train.max_steps", "train.epochs", "train.max_minutes",
    # where and how often things are written
    "train.output_dir", "train.log_every", "train.save_every", "train.keep_last", "train.tensorboard",
    "train.merge_lora",
    # where it runs, and exact speed/memory trade-offs (same numbers up to float rounding)
    "train.device", "train.cache_frozen_layers", "train.cache_max_gb", "model.attn_implementation",
    "model.gradient_checkpointing", "loss.grad_cache", "loss.grad_cache_chunk_size", "loss.grad_cache_max_tokens",
    "loss.sub_batch_size", "loss.embed_distill_cache", "data.num_workers",
    # evaluation cadence, device-side batch and size (the best-checkpoint choice keeps its metric)
    "eval.every", "eval.batch_size", "eval.max_queries",
})
"""Config keys that may differ between a run and its ``--resume``; any other change is refused
(``resume_changes``) before the model loads, because it changes the shape or meaning of the saved
state (LoRA rank, layers, template tokens, data, loss...)."""


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and not full.startswith(("data.dataset_weights", "data.dataset_modes")):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def resume_changes(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each key outside ``RESUMABLE_KEYS`` that differs.

    ``saved`` is the run's ``config.yaml`` (a ``Config.to_dict()``); keys it lacks (written by an
    older denselm) are not compared.
    """
    old, new = _flatten(saved or {}), _flatten(cfg.to_dict())
    changes = []
    for key, value in new.items():
        if key in RESUMABLE_KEYS or key not in old:
            continue
        before = old[key]
        if isinstance(before, tuple):
            before = list(before)
        if before != (list(value) if isinstance(value, tuple) else value):
            changes.append((key, before, value))
    return changes


# ----------------------------------------------------------------- building
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to a field's annotated type; ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return build(tp, value, prefix=key)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number) and re.sub(r"\[\d+\]$", "", key) not in NON_FINITE_OK:
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a (nested) dict, naming bad keys as ``prefix.key``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (values or {}).items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(f'{prefix}.{c}' if prefix else c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def parse_overrides(args: list[str]) -> dict:
    """``['--train.lr', '2e-4', '--model.lora.r=8']`` -> nested dict with YAML-parsed values."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) is False and value is None and raw not in ("null", "~", "None"):
            value = raw
        if raw == "None":
            value = None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in extra.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and k in out and out[k] is not None and not isinstance(out[k], dict):
            # `train: 5` plus a --train.* override: never silently replace the scalar by defaults
            raise ConfigError(f"{full} must be a mapping of keys, got {out[k]!r}")
        out[k] = _merge(out[k], v, full) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply overrides, build and validate the Config."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    values = _merge(values, parse_overrides(overrides or []))
    return build(Config, values)
