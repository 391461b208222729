"""Tokenisation with a guaranteed trailing EOS, and padding on either side.

Last-token pooling reads the hidden state at each sequence's final real
token, so that token must be the same special token for every text: EOS.
Tokenizers disagree on whether they append it (`add_eos_token=True` is only
honoured by Llama/Mistral/Gemma-style tokenizers; Qwen tokenizers silently
ignore it, and for Qwen3 pad == eos), so we never rely on them: texts are
tokenized without special tokens, truncated to ``max_length - 1 - n_prefix``,
then the tokenizer's own prefix specials (BOS, where it adds one) are put in
front and the EOS id appended by hand.

Memory and time are bounded per text: ``bounded_ids`` tokenizes only a
character prefix of each text, long enough that the token limit still decides
(a 50 MB passage costs what its first few thousand tokens cost, not seconds
and hundreds of MB).  Every tokenizer call on user text in denselm goes
through it (here and in ``denselm.data.templates``).

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


CUT_MARGIN = 16
"""Tokens a character cut must yield beyond the ones kept before it is accepted.

SentencePiece-style and BPE tokenizers are not prefix-stable: the ids just
before a cut can differ from those of the whole text (a merge or a Viterbi
path that the cut breaks).  In practice the difference stays next to the cut,
so ids that lie this many tokens before it are the whole text's ids
(tests/test_tokenize.py checks it on random texts and three tokenizer kinds).
"""
MIN_CHAR_BUDGET = 1024
"""Smallest first cut, in characters (tokenizers whose longest token is tiny)."""
DEFAULT_LONGEST_TOKEN = 128
"""Characters per token assumed for tokenizer objects without a vocabulary to measure."""


def longest_token_chars(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (added tokens included), cached per vocabulary.

    An upper bound on the input characters one token covers for byte-level BPE
    (entries are spelled one character per byte) and SentencePiece (``▁`` is one
    space; byte-fallback entries ``<0xE4>`` overestimate).  Normalisers that
    shrink text can break it; ``bounded_ids`` checks the token count instead of
    trusting it.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:  # not a transformers tokenizer: a guess; bounded_ids checks the count anyway
        return DEFAULT_LONGEST_TOKEN
    size = len(tokenizer)  # grows when template tokens are added: recompute then
    cached = getattr(tokenizer, "_denselm_longest_token", None)
    if cached is not None and cached[0] == size:
        return cached[1]
    longest = max((len(t) for t in get_vocab()), default=1)
    try:
        tokenizer._denselm_longest_token = (size, longest)
    except Exception:  # pragma: no cover - exotic tokenizer objects without __dict__
        pass
    return longest


def char_budget(tokenizer, keep: int) -> int:
    """First character cut for a text of which ``keep`` tokens are kept: enough for ``keep + CUT_MARGIN`` tokens."""
    return max(MIN_CHAR_BUDGET, longest_token_chars(tokenizer) * (keep + CUT_MARGIN))


def _cut(text: str, budget: int) -> str:
    """``text[:budget]``, moved back to just before a space or newline in its second half if there is one.

    Pre-tokenizers split at whitespace, so a cut there leaves every word whole:
    byte-level BPE then yields exactly a prefix of the whole text's ids, and
    WordPiece does not see a long word turn into a short one (its
    ``max_input_chars_per_word`` makes a 200-character word one [UNK], its first
    90 characters many pieces).
    """
    if len(text) <= budget:
        return text
    piece = text[:budget]  # copies only `budget` characters: a 50 MB text costs nothing until here
    j = max(piece.rfind(" ", budget // 2), piece.rfind("\n", budget // 2))
    return piece[:j] if j > 0 else piece


def _bounded(tokenizer, texts: Sequence[str], keep: int, budget: int | None) -> list[tuple[str, list[int]]]:
    """(accepted prefix, its ids) per text; see ``bounded_ids``."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    texts = list(texts)
    out: list[tuple[str, list[int]] | None] = [None] * len(texts)
    budget = char_budget(tokenizer, keep) if budget is None else max(1, int(budget))
    need = keep + CUT_MARGIN
    pending = list(range(len(texts)))
    while pending:
        pieces = [_cut(texts[i], budget) for i in pending]
        # verbose=False: a cut longer than model_max_length is expected here, not an indexing error
        ids = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
        retry = []
        for i, piece, x in zip(pending, pieces, ids):
            if len(piece) == len(texts[i]) or len(x) >= need:
                out[i] = (piece, list(x))
            else:
                retry.append(i)
        pending = retry
        budget *= 2
    return out  # type: ignore[return-value]


def bounded_ids(tokenizer, texts: Sequence[str], keep: int, *, budget: int | None = None) -> list[list[int]]:
    """Ids (no special tokens) whose first ``keep`` equal the whole text's, tokenizing only a prefix.

    Each text is cut to ``budget`` characters (default ``char_budget``; moved
    back to a space when there is one); the cut is accepted when it yields at
    least ``keep + CUT_MARGIN`` ids, else the budget doubles (a normaliser that
    drops characters, many characters per token) until it covers the whole
    text.  A text no longer than the budget is tokenized whole, so its ids are
    exact; a cut text's list holds more than ``keep`` ids, so ``len(ids) > keep``
    still says whether the text was cut.
    """
    return [ids for _, ids in _bounded(tokenizer, texts, keep, budget)]


def bounded_texts(tokenizer, texts: Sequence[str], keep: int) -> list[str]:
    """Each text cut to a prefix whose first ``keep`` tokens are the whole text's (for code that tokenizes itself).

    For libraries that take strings and truncate after tokenizing everything
    (sentence-transformers teachers in ``denselm score``): hand them these.
    """
    return [piece for piece, _ in _bounded(tokenizer, texts, keep, None)]


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
    room = max_length - 1 - len(specials.prefix)
    bodies = bounded_ids(tokenizer, texts, max(room, 0))
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
