"""Typed settings of the training data pipeline (the ``data:`` section of a train config).

Every field has a one-line description under it; ``__post_init__`` rejects bad
values with a message naming the field as ``data.<field>``.  Defaults follow
FlagEmbedding's BGE-EN-ICL finetune (``research/llm_dense_retriever/finetune``)
except where noted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..spec import DEFAULT_SPEC, QUERY_CUTS, TEMPLATE_NAMES  # noqa: F401  (TEMPLATE_NAMES: re-exported)
MODES = ("normal", "custom")


@dataclass
class DataConfig:
    train_data: list[str] = field(default_factory=list)
    """JSONL files or folders of ``*.jsonl`` files (searched recursively); each file is one dataset."""
    group_size: int = 8
    """Passages per query for retrieval data: 1 positive + group_size - 1 negatives (seed: train_group_size)."""
    query_max_len: int = DEFAULT_SPEC.query_max_len
    """Maximum query tokens, BOS and EOS included; in-context examples count too."""
    passage_max_len: int = DEFAULT_SPEC.passage_max_len
    """Maximum passage tokens, BOS and EOS included."""
    query_cut: str = DEFAULT_SPEC.query_cut
    """Cutting a too-long query of a suffix template: "token" (cut the ids, then the suffix's ids:
    what sentence-transformers reproduces) or "retokenize" (decode the cut, tokenize it with the
    suffix again: the seed's way)."""
    dataset_weights: dict[str, float] = field(default_factory=dict)
    """Per-dataset epoch multiplier (key: file path, file stem, or a train_data entry): 2.0 = two passes, 0.5 = a random half each epoch."""
    max_examples_per_dataset: int | None = None
    """Cap on examples per dataset: a random subset fixed for the whole run (seed: max_example_num_per_dataset)."""
    dataset_modes: dict[str, str] = field(default_factory=dict)
    """Per-dataset loss mode override, "normal" (in-batch negatives) or "custom" (own group only); default from `type`."""
    prompt: str | None = DEFAULT_SPEC.prompt
    """Global instruction for queries; a line's own "prompt" field wins over it."""
    template: str = DEFAULT_SPEC.template
    """Query format preset: bge-icl, bge-icl-special, e5-mistral, qwen3-embedding or none."""
    passage_prefix: str = DEFAULT_SPEC.passage_prefix
    """Text put in front of every retrieval passage (e.g. "passage: "); empty in the seed."""
    icl_max_examples: int = 0
    """In-context examples per query are drawn uniformly from 0..icl_max_examples (seed: 5; 0 disables)."""
    icl_token_budget: int | None = None
    """Most tokens the in-context examples may take in a query; None = query_max_len // 2."""
    example_query_max_len: int = 64
    """Tokens kept of an in-context example's query (seed default)."""
    example_passage_max_len: int = 96
    """Tokens kept of an in-context example's response (seed default)."""
    symmetric_group_size: int = 8
    """Group size for `symmetric_sts` / `symmetric_clustering` data (seed: symmetric_train_group_size)."""
    symmetric_batch_size: int | None = None
    """Global batch size for symmetric data; None = the normal global batch (seed: symmetric_batch_size)."""
    max_class_neg: int = 7
    """Negatives per query for `symmetric_class` data (the seed's README recipe uses 7; its code default is 1000)."""
    mask_false_negatives: bool = True
    """Build a mask of passages identical to a query's positive so the loss does not count them as negatives."""
    mask_same_document: bool = False
    """Also mask in-batch passages from the positive's document: ids from pos_id/pos_ids/neg_ids, else a
    hash of the text (then every positive of the example counts as its document), across ranks."""
    padding_side: str = "left"
    """Padding side of query/passage tensors ("left" puts every EOS at position -1, as the seed)."""
    pad_to_multiple_of: int | None = None
    """Round padded lengths up to a multiple of this (tensor-core friendly); None = batch maximum."""
    seed: int = 42
    """Seed of every random choice (batch order, positives, negatives, examples, caps)."""
    num_workers: int = 2
    """DataLoader worker processes that read, format and tokenize batches (0 = in the main process)."""

    def __post_init__(self) -> None:
        if isinstance(self.train_data, str):  # a single path is a common YAML shorthand
            self.train_data = [self.train_data]
        if not isinstance(self.train_data, (list, tuple)) or not all(isinstance(p, str) and p for p in self.train_data):
            raise ValueError(f"data.train_data must be a list of file or folder paths, got {self.train_data!r}")
        self.train_data = list(self.train_data)
        for name in ("group_size", "query_max_len", "passage_max_len", "symmetric_group_size",
                     "example_query_max_len", "example_passage_max_len"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("max_class_neg", self.max_class_neg, minimum=1)
        _check_int("icl_max_examples", self.icl_max_examples, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        _check_int("num_workers", self.num_workers, minimum=0)
        if self.max_examples_per_dataset is not None:
            _check_int("max_examples_per_dataset", self.max_examples_per_dataset, minimum=1)
        if self.symmetric_batch_size is not None:
            _check_int("symmetric_batch_size", self.symmetric_batch_size, minimum=1)
        if self.pad_to_multiple_of is not None:
            _check_int("pad_to_multiple_of", self.pad_to_multiple_of, minimum=1)
        if self.query_max_len < 4 or self.passage_max_len < 4:
            raise ValueError("data.query_max_len and data.passage_max_len must be at least 4 (BOS, text, suffix, EOS)")
        if self.query_cut not in QUERY_CUTS:
            raise ValueError(f"data.query_cut must be one of {', '.join(QUERY_CUTS)}; got {self.query_cut!r}")
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"data.template must be one of {', '.join(TEMPLATE_NAMES)}; got {self.template!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"data.padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"data.prompt must be a string or null, got {type(self.prompt).__name__}")
        if not isinstance(self.passage_prefix, str):
            raise ValueError(f"data.passage_prefix must be a string, got {type(self.passage_prefix).__name__}")
        if not isinstance(self.dataset_weights, dict):
            raise ValueError("data.dataset_weights must be a mapping of dataset -> weight")
        for key, weight in self.dataset_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
                raise ValueError(f"data.dataset_weights[{key!r}] must be a finite number >= 0, got {weight!r}")
        if not isinstance(self.dataset_modes, dict):
            raise ValueError("data.dataset_modes must be a mapping of dataset -> 'normal' | 'custom'")
        for key, mode in self.dataset_modes.items():
            if mode not in MODES:
                raise ValueError(f"data.dataset_modes[{key!r}] must be 'normal' or 'custom', got {mode!r}")
        if self.icl_max_examples > 0:
            if self.template not in ("bge-icl", "bge-icl-special"):
                raise ValueError(
                    f"data.icl_max_examples > 0 needs template bge-icl or bge-icl-special, got {self.template!r}"
                )
            budget = self.resolved_icl_token_budget
            if not 0 < budget < self.query_max_len:
                raise ValueError(
                    f"data.icl_token_budget must be between 1 and data.query_max_len - 1 "
                    f"({self.query_max_len - 1}), got {budget}"
                )

    @property
    def resolved_icl_token_budget(self) -> int:
        """The explicit budget, or half the query length when unset."""
        return self.query_max_len // 2 if self.icl_token_budget is None else int(self.icl_token_budget)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
