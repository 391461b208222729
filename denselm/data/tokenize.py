"""Tokenisation with a guaranteed trailing EOS, and padding on either side.

Last-token pooling reads the hidden state at each sequence's final real
token, so that token must be the same special token for every text: EOS.
Tokenizers disagree on whether they append it (`add_eos_token=True` is only
honoured by Llama/Mistral/Gemma-style tokenizers; Qwen tokenizers silently
ignore it, and for Qwen3 pad == eos), so we never rely on them: texts are
tokenized without special tokens, truncated to ``max_length - 1 - n_prefix``,
then the tokenizer's own prefix specials (BOS, where it adds one) are put in
front and the EOS id appended by hand.

Usage::

    ids = tokenize_with_eos(tok, ["a text", "another"], max_length=512)
    batch = pad_batch(ids, pad_id=pad_token_id(tok), padding_side="left")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a tokenizer puts around a text, worked out once per tokenizer."""

    prefix: tuple[int, ...]
    """Ids the tokenizer prepends with ``add_special_tokens=True`` (e.g. BOS)."""
    eos_id: int
    """The id appended to every sequence; the pooled position holds it."""
    pad_id: int
    """Padding id (may equal ``eos_id``: the attention mask, never the id, marks padding)."""


def eos_token_id(tokenizer) -> int:
    """The tokenizer's EOS id; a ValueError when it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token; set tokenizer.eos_token "
            "(last-token pooling needs a fixed final token)"
        )
    if isinstance(eos, (list, tuple)):  # some configs list several EOS ids; the first is canonical
        eos = eos[0]
    return int(eos)


def pad_token_id(tokenizer) -> int:
    """The padding id, falling back to EOS (safe: padding is masked out everywhere)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def special_tokens(tokenizer) -> SpecialTokens:
    """Find which ids the tokenizer adds in front of a text (BOS), from the empty string.

    Whatever it appends (an EOS of its own under ``add_eos_token=True``) is
    dropped: we append EOS ourselves so that it is there exactly once.
    """
    cached = getattr(tokenizer, "_denselm_special_tokens", None)
    if cached is not None:
        return cached
    eos = eos_token_id(tokenizer)
    probe = "x"
    with_specials = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    prefix: list[int] = []
    # The bare ids appear inside the special-token version; whatever is before them is the prefix.
    for start in range(len(with_specials) - len(bare) + 1):
        if with_specials[start : start + len(bare)] == bare:
            prefix = with_specials[:start]
            break
    prefix = [i for i in prefix if i != eos]  # never a stray EOS before the text
    result = SpecialTokens(prefix=tuple(prefix), eos_id=eos, pad_id=pad_token_id(tokenizer))
    try:
        tokenizer._denselm_special_tokens = result
    except Exception:  # pragma: no cover - exotic tokenizer objects without __dict__
        pass
    return result


def truncate_with_eos(body_ids: Sequence[int], specials: SpecialTokens, max_length: int) -> list[int]:
    """``prefix + body[: max_length - 1 - len(prefix)] + [eos]`` (the body never holds specials)."""
    room = max_length - 1 - len(specials.prefix)
    if room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for text after {len(specials.prefix)} prefix "
            "token(s) and the EOS token"
        )
    return [*specials.prefix, *list(body_ids)[:room], specials.eos_id]


def tokenize_with_eos(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    *,
    return_truncated: bool = False,
):
    """Token ids for each text: tokenizer prefix (BOS) + text ids cut to fit + EOS.

    Every returned list has length <= ``max_length`` and ends with EOS, whatever
    the tokenizer's own ``add_eos_token`` behaviour.  With ``return_truncated``
    also returns how many texts were cut.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize_with_eos expects a list of texts, got one str")
    specials = special_tokens(tokenizer)
    if len(texts) == 0:
        return ([], 0) if return_truncated else []
    bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    room = max_length - 1 - len(specials.prefix)
    out = [truncate_with_eos(body, specials, max_length) for body in bodies]
    if return_truncated:
        return out, sum(len(body) > room for body in bodies)
    return out


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "left",
    pad_to_multiple_of: int | None = None,
    dtype: torch.dtype = torch.long,
) -> dict[str, torch.Tensor]:
    """Pad id lists to one (B, T) tensor plus its attention mask.

    Left padding puts every row's EOS at position -1 (what the seed assumes);
    right padding is equally correct for our pooling, which finds each row's
    last real token from the mask.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(sequences) == 0:
        raise ValueError("pad_batch got no sequences")
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_id, dtype=dtype)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            raise ValueError(f"pad_batch: sequence {row} is empty")
        ids = torch.as_tensor(list(seq), dtype=dtype)
        if padding_side == "left":
            input_ids[row, length - n :] = ids
            attention_mask[row, length - n :] = 1
        else:
            input_ids[row, :n] = ids
            attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    padding_side: str = "left",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """``tokenize_with_eos`` then ``pad_batch``: the one call most code needs."""
    ids = tokenize_with_eos(tokenizer, texts, max_length)
    return pad_batch(ids, special_tokens(tokenizer).pad_id, padding_side, pad_to_multiple_of)
