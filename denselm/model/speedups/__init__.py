"""The encoding speed-ups, which of them combine, and in what order they compose.

    python -c "from denselm.model.speedups import render_table; print(render_table())"   # the README's table

Four exact speed-ups (each tested equal to the plain path), one module each:
- ``packing``: padding-free rows, attention kept inside each sequence (``model.packing``).
- ``prefix_cache``: the frozen blocks below the LoRA ones computed once per distinct text
  (``train.cache_frozen_layers``).
- ``pooled_only``: the last block's MLP runs only at the pooled tokens (automatic with
  last/first pooling, in encoding and in training unless the last block is checkpointed).
- gradient caching (``denselm.gradcache``, ``loss.grad_cache``): a big batch's loss and
  gradients at one chunk's activation memory.
Two automatic ones that change no setting's meaning: ``lora_add`` (peft LoRA updates added into
the frozen layer's output in place: bit-identical for power-of-two scaling) and ``fused_norm``
(one ``F.rms_norm`` pass per RMSNorm, inference only).  And one choice of precision inside
``packing``: bf16 training on a CPU without AMX runs the packed attention in float32, whose CPU
backward is faster there (``packing.float32_attention``).
``common`` holds the one way they change a model: swap an attribute (a block's
``forward``, a config field) for a scope and always restore it.

Order of composition, outermost first, in one ``BiEncoderModel`` encoding call:
1. position policy: ``position_ids`` for the whole padded batch (``with_positions``), before
   any chunking, so chunks keep the positions the whole batch gives;
2. gradient cache: the batch split into chunks, encoded without a graph, the loss's
   embedding gradients cached, then each chunk re-encoded with a graph (``gradcache``);
3. frozen-layer cache: for each chunk, the frozen blocks' output looked up (computed for new
   texts) and the frozen blocks' forwards swapped to serve it (``FrozenPrefixCache.serving``);
4. packing: the chunk's real tokens laid into rows of at most ``packing_max_tokens``, each run
   with the backbone's config naming the packed kernel (``packing.attention_scope``; the cache
   serves these rows in order);
5. pooled-only MLP: around each backbone call (a padded batch or a packed row), the last
   block's MLP restricted to the pooled tokens (``pooled_only.last_mlp_only_at``);
6. the backbone's own forward (its LoRA layers adding in place, ``lora_add.fast_lora``, and its
   RMSNorms fused under no_grad), then pooling (last, first or mean) and normalisation.
Every scope restores what it swapped on exit, also on exceptions, so the layers leave the
backbone as they found it.

``COMBINATIONS`` says for every pair of a speed-up and another setting whether it is valid;
``RULES`` are the invalid ones (and the other requirements), checked once by ``validate`` when
the config is built (``denselm.config.Config``), with an error naming both flags.  This module
imports nothing heavy: the config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One column of the table: a speed-up, a position policy or a pooling kind."""

    key: str
    """Short name used in ``COMBINATIONS``."""
    title: str
    """Column heading."""
    flag: str
    """How it is switched on (a config key and value), or when it applies."""


SPEEDUPS = (
    Setting("packing", "packing", "`model.packing: true`"),
    Setting("frozen_cache", "frozen-layer cache", "`train.cache_frozen_layers: true`"),
    Setting("pooled_only", "pooled-only MLP", "automatic: last/first pooling, not with a checkpointed last block"),
    Setting("grad_cache", "gradient cache", "`loss.grad_cache: true`"),
)
OTHER_SETTINGS = (
    Setting("end_aligned", "positions end_aligned", "`model.position_ids: end_aligned`"),
    Setting("from_zero", "positions from_zero", "`model.position_ids: from_zero`"),
    Setting("last", "pooling last", "`model.pooling: last`"),
    Setting("first", "pooling first", "`model.pooling: first`"),
    Setting("mean", "pooling mean", "`model.pooling: mean`"),
)


@dataclass(frozen=True)
class Rule:
    """``flag`` set to ``value`` needs one of ``needs`` (or, with ``excludes``, must not meet it).

    Each condition is (config key, shown value, predicate on that key's value); a rule
    whose keys are not all known (a library call that passes only some) is not checked.
    """

    flag: str
    value: Any
    needs: tuple[tuple[str, str, Callable[[Any], bool]], ...] = ()
    excludes: tuple[str, str, Callable[[Any], bool]] | None = None
    why: str = ""

    def keys(self) -> list[str]:
        return [self.flag] + [k for k, _, _ in self.needs] + ([self.excludes[0]] if self.excludes else [])

    def message(self) -> str:
        """``A needs B: b or C: c: why`` / ``A is not supported with B: b: why`` (config keys, as written in YAML)."""
        if self.excludes is not None:
            key, shown, _ = self.excludes
            text = f"{self.flag} is not supported with {key}: {shown}"
        else:
            text = f"{self.flag} needs " + " or ".join(f"{k}: {shown}" for k, shown, _ in self.needs)
        return f"{text} ({self.why})" if self.why else text

    def violated(self, values: Mapping[str, Any]) -> bool:
        if values[self.flag] != self.value:
            return False
        if self.excludes is not None:
            key, _, test = self.excludes
            return test(values[key])
        return not any(test(values[k]) for k, _, test in self.needs)


FROM_ZERO_RULE = Rule(
    "train.cache_frozen_layers", True,
    needs=(("model.position_ids", "from_zero", lambda v: v == "from_zero"),
           ("model.packing", "true", lambda v: v is True)),
    why="with end_aligned a text's positions, hence its cached hidden states, depend on its batch",
)
RULES = (
    Rule("train.cache_frozen_layers", True,
         needs=(("model.lora.top_layers", "N", lambda v: v is not None and v >= 1),),
         why="the layers below the adapted ones are what is cached"),
    Rule("train.cache_frozen_layers", True,
         needs=(("model.lora.enabled", "true", lambda v: v is True),),
         why="without LoRA every layer trains, so none is frozen"),
    FROM_ZERO_RULE,
    Rule("train.cache_frozen_layers", True,
         excludes=("train.strategy", "fsdp", lambda v: v == "fsdp"),
         why="the cache swaps the forwards of blocks that FSDP2 shards and wraps"),
)


@dataclass(frozen=True)
class Cell:
    """One pair's verdict: ``valid`` and a short note (the README cell)."""

    valid: bool
    note: str
    rule: Rule | None = None
    """The rule that rejects an invalid pair."""


def _ok(note: str = "yes") -> Cell:
    return Cell(True, note)


# Every (speed-up, setting) pair; a pair of two speed-ups is listed once.
COMBINATIONS: dict[tuple[str, str], Cell] = {
    ("packing", "frozen_cache"): _ok("yes: the cache serves packed rows"),
    ("packing", "pooled_only"): _ok("yes: per packed row"),
    ("packing", "grad_cache"): _ok("yes: each chunk packed"),
    ("packing", "end_aligned"): _ok("becomes from_zero (same scores under RoPE)"),
    ("packing", "from_zero"): _ok(),
    ("packing", "last"): _ok(),
    ("packing", "first"): _ok(),
    ("packing", "mean"): _ok(),
    ("frozen_cache", "pooled_only"): _ok("yes: the top block of each step"),
    ("frozen_cache", "grad_cache"): _ok("yes: per chunk"),
    ("frozen_cache", "end_aligned"): Cell(False, "no, unless packing", FROM_ZERO_RULE),
    ("frozen_cache", "from_zero"): _ok(),
    ("frozen_cache", "last"): _ok(),
    ("frozen_cache", "first"): _ok(),
    ("frozen_cache", "mean"): _ok(),
    ("pooled_only", "grad_cache"): _ok("yes: both passes"),
    ("pooled_only", "end_aligned"): _ok(),
    ("pooled_only", "from_zero"): _ok(),
    ("pooled_only", "last"): _ok(),
    ("pooled_only", "first"): _ok(),
    ("pooled_only", "mean"): _ok("no-op: every token is read"),
    ("grad_cache", "end_aligned"): _ok("yes: positions from the whole batch"),
    ("grad_cache", "from_zero"): _ok(),
    ("grad_cache", "last"): _ok(),
    ("grad_cache", "first"): _ok(),
    ("grad_cache", "mean"): _ok(),
}


def combination(a: str, b: str) -> Cell:
    """The verdict for a pair, in either order."""
    if (a, b) in COMBINATIONS:
        return COMBINATIONS[(a, b)]
    return COMBINATIONS[(b, a)]


def _value(settings: Any, key: str) -> Any:
    """``settings["model.packing"]`` for a flat mapping, ``settings.model.packing`` for a Config."""
    if isinstance(settings, Mapping):
        return settings[key]
    node = settings
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(settings: Any) -> None:
    """Raise ConfigError naming both flags for the first invalid combination.

    ``settings``: a ``denselm.config.Config``, or a flat mapping of config keys (``"model.packing"``)
    to values; rules about keys the mapping lacks are skipped.
    """
    for rule in RULES:
        try:
            values = {key: _value(settings, key) for key in rule.keys()}
        except (KeyError, AttributeError):
            continue
        if rule.violated(values):
            raise ConfigError(rule.message())


def render_table() -> str:
    """The README's markdown: the combination table, what is rejected, and the composition order."""
    columns = SPEEDUPS + OTHER_SETTINGS
    lines = [
        "| speed-up (how it is switched on) | " + " | ".join(c.title for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in SPEEDUPS:
        cells = ["-" if c.key == row.key else combination(row.key, c.key).note for c in columns]
        lines.append(f"| {row.title} ({row.flag}) | " + " | ".join(cells) + " |")
    lines += ["", "Rejected when the config is loaded (exit code 2, the error names both keys):", ""]
    lines += [f"- `{rule.message()}`" for rule in RULES]
    lines += ["", "They compose in this order (outermost first): position ids for the whole batch, "
              "gradient-cache chunks, frozen-layer cache, packed rows, pooled-only MLP, the backbone."]
    return "\n".join(lines)
