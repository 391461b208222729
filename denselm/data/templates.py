"""Query and passage formats: the seed's BGE-EN-ICL strings and presets for other models.

A query is ``{examples}{head}{query}{suffix}``; with the plain "bge-icl" preset::

    format_query("bge-icl", "Given a question, retrieve answers", "what is x")
    -> 'Instruct: Given a question, retrieve answers\\nQuery: what is x\\nResponse:'

Each in-context example is ``{head}{q}{example_sep}{response}\\n\\n``.  The EOS
(and BOS where the tokenizer adds one) comes later from
``denselm.data.tokenize.tokenize_with_eos``.  ``fit_query_ids`` cuts a too-long query so that
the suffix always survives truncation: by default (``query_cut: token``) its ids are cut and the
suffix's ids follow, as sentence-transformers restores a chat template's tail, so exports
reproduce it; ``fit_queries`` (``query_cut: retokenize``) is the seed's way: cut the ids, decode
them, tokenize them again with the suffix;
like every tokenization of user text it tokenizes only a bounded prefix of a
long text (``denselm.data.tokenize.bounded_ids``), never the whole of it.

This module imports neither torch nor transformers: inference code can format
queries cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

SPECIAL_TEMPLATE_TOKENS = ("<instruct>", "<query>", "<response>")


@dataclass(frozen=True)
class Template:
    """How a query (and its in-context examples) is laid out around the text."""

    name: str
    head: str
    """Text before the query; ``{prompt}`` is replaced by the instruction."""
    suffix: str
    """Text after the query; never truncated away."""
    example_sep: str | None
    """Between an example's query and its response; None = no in-context examples."""
    example_end: str = "\n\n"
    """After each example."""
    special_tokens: tuple[str, ...] = ()
    """Tokens that must be in the tokenizer's vocabulary (see ``add_template_tokens``)."""

    @property
    def needs_prompt(self) -> bool:
        return "{prompt}" in self.head


class ICLExample(NamedTuple):
    """One in-context example: the instruction, a query and its response (a positive)."""

    prompt: str | None
    query: str
    response: str


TEMPLATES: dict[str, Template] = {
    # FlagEmbedding get_query_prompt(use_special_tokens=False) + '\nResponse:'
    "bge-icl": Template("bge-icl", "Instruct: {prompt}\nQuery: ", "\nResponse:", "\nResponse: "),
    # the same with the three added tokens (BAAI/bge-en-icl's released format)
    "bge-icl-special": Template(
        "bge-icl-special", "<instruct>{prompt}\n<query>", "\n<response>", "\n<response>",
        special_tokens=SPECIAL_TEMPLATE_TOKENS,
    ),
    # intfloat/e5-mistral-7b-instruct: get_detailed_instruct
    "e5-mistral": Template("e5-mistral", "Instruct: {prompt}\nQuery: ", "", None),
    # Qwen/Qwen3-Embedding: get_detailed_instruct (no space after 'Query:')
    "qwen3-embedding": Template("qwen3-embedding", "Instruct: {prompt}\nQuery:", "", None),
    # the text alone
    "none": Template("none", "", "", None),
}


def get_template(template: str | Template) -> Template:
    """The preset of that name (or the Template itself)."""
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise _user_error("ConfigError", f"unknown template {template!r}; known: {', '.join(TEMPLATES)}") from None


def _head(t: Template, prompt: str | None) -> str:
    if not t.needs_prompt:
        return t.head
    if prompt is None:
        raise _user_error("UserError", f"template {t.name!r} needs a prompt (an instruction); got None")
    return t.head.replace("{prompt}", prompt)


def format_example(template: str | Template, example: ICLExample | tuple) -> str:
    """``{head}{query}{example_sep}{response}{example_end}`` for one in-context example."""
    t = get_template(template)
    if t.example_sep is None:
        raise ValueError(f"template {t.name!r} has no in-context example format")
    prompt, query, response = example
    return f"{_head(t, prompt)}{query}{t.example_sep}{response}{t.example_end}"


def split_query(
    template: str | Template, prompt: str | None, query: str, examples: Sequence[ICLExample | tuple] = ()
) -> tuple[str, str]:
    """(examples + head + query, suffix): the part that may be truncated and the part that may not."""
    t = get_template(template)
    prefix = "".join(format_example(t, ex) for ex in examples)
    return prefix + _head(t, prompt) + query, t.suffix


def format_query(
    template: str | Template, prompt: str | None, query: str, examples: Sequence[ICLExample | tuple] = ()
) -> str:
    """The full query string the encoder sees (before BOS/EOS)."""
    body, suffix = split_query(template, prompt, query, examples)
    return body + suffix


def format_passage(template: str | Template, text: str, prefix: str = "") -> str:
    """A passage is its text (after an optional prefix) for every preset."""
    get_template(template)  # validate the name
    return prefix + text


# --- token-level fitting (needs a tokenizer; no torch import at module level) ---------------------


def _ids(tokenizer, texts: list[str], keep: int) -> list[list[int]]:
    """Ids whose first ``keep`` are exact; only a prefix of a long text is tokenized (see ``bounded_ids``)."""
    from denselm.data.tokenize import bounded_ids  # torch import deferred to first use

    if not texts:
        return []
    return bounded_ids(tokenizer, texts, keep)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # clean_up_tokenization_spaces would rewrite " ." and friends; keep the text as cut
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def truncate_text(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    """The text cut to ``max_tokens`` tokens (decoded back to a string), and whether it was cut."""
    ids = _ids(tokenizer, [text], max_tokens)[0]
    if len(ids) <= max_tokens:
        return text, False
    return _decode(tokenizer, ids[:max_tokens]), True


def fit_to_length(tokenizer, bodies: Sequence[str], suffix: str, max_length: int) -> tuple[list[str], int]:
    """``body + suffix`` strings that tokenize to at most ``max_length`` ids with BOS and EOS.

    Over-long bodies are cut at token level and decoded (the seed's way), so the
    suffix always survives.  Without a suffix the texts come back whole (the ids are
    cut later, by ``tokenize_with_eos``).  Decoding then re-tokenizing can merge tokens across
    the cut differently; the loop re-checks and cuts further until it fits.
    Returns (texts, how many were cut).
    """
    from denselm.data.tokenize import special_tokens  # torch import deferred to first use

    room = max_length - 1 - len(special_tokens(tokenizer).prefix)
    suffix_len = len(_ids(tokenizer, [suffix], room)[0]) if suffix else 0
    if suffix_len >= room:
        raise ValueError(f"max_length={max_length} leaves no room for text before the suffix {suffix!r}")
    texts = [b + suffix for b in bodies]
    # Only whether a text exceeds `room` matters here; a cut text reports more than `room` ids.
    lengths = [len(x) for x in _ids(tokenizer, texts, room)]
    over = [i for i, n in enumerate(lengths) if n > room]
    if not suffix:
        # Nothing to keep after the text: ``tokenize_with_eos`` cuts the ids themselves, as it cuts
        # passages and as sentence-transformers, TEI and vLLM truncate.  Decoding a cut and
        # re-tokenizing it would turn a character split across byte-level tokens into U+FFFD.
        return texts, len(over)
    if over:
        body_ids = _ids(tokenizer, [bodies[i] for i in over], room)
        for i, ids in zip(over, body_ids):
            keep = room - suffix_len
            while True:
                text = _decode(tokenizer, ids[:keep]) + suffix
                excess = len(_ids(tokenizer, [text], room)[0]) - room
                if excess <= 0 or keep == 0:
                    break
                keep = max(0, keep - excess)
            texts[i] = text
    return texts, len(over)


_SUFFIX_FILLERS = ("0", "1 2 3 4")
"""Two contents that tokenize differently: what sentence-transformers renders to find a template's tail."""


def suffix_ids(tokenizer, head: str, suffix: str) -> list[int]:
    """The ids written after a cut query: the suffix as tokenized after some text.

    Derived as sentence-transformers derives a chat template's tail (``restore_suffix``): ``head +
    filler + suffix`` is tokenized for two fillers and the longest common token tail is the suffix,
    so that an exported model writes the very same ids.  Cached on the tokenizer per (head, suffix).
    """
    if not suffix:
        return []
    cache = getattr(tokenizer, "_denselm_suffix_ids", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._denselm_suffix_ids = cache
        except Exception:  # pragma: no cover - tokenizer objects without __dict__
            pass
    key = (head, suffix)
    if key not in cache:
        first, second = (tokenizer(head + filler + suffix, add_special_tokens=False)["input_ids"]
                         for filler in _SUFFIX_FILLERS)
        count = 0
        for a, b in zip(reversed(first), reversed(second)):
            if a != b:
                break
            count += 1
        cache[key] = list(first[len(first) - count:])
    return list(cache[key])


def fit_query_ids(
    tokenizer,
    template: str | Template,
    prompts: Sequence[str | None],
    queries: Sequence[str],
    max_length: int,
    examples: Sequence[Sequence[ICLExample | tuple]] | None = None,
    cut: str = "token",
) -> tuple[list[list[int]], int]:
    """Token ids (BOS + examples + head + query + suffix + EOS, at most ``max_length``) and how many were cut.

    ``cut="token"``: a body that reaches the limit keeps its first ids and the suffix's ids
    (``suffix_ids``) are written after them, exactly what sentence-transformers does to a chat
    template's tail on truncation, so the exported model reproduces these ids.  ``cut="retokenize"``:
    the seed's way (``fit_queries``: decode the cut, tokenize it again with the suffix).  Without
    a suffix both cut the ids at the end.
    """
    from denselm.data.tokenize import special_tokens, tokenize_with_eos  # torch import deferred

    t = get_template(template)
    if cut == "retokenize" or not t.suffix:
        texts, n_cut = fit_queries(tokenizer, t, prompts, queries, max_length, examples)
        return tokenize_with_eos(tokenizer, texts, max_length), n_cut
    if cut != "token":
        raise ValueError(f"cut must be 'token' or 'retokenize', got {cut!r}")
    specials = special_tokens(tokenizer)
    room = max_length - 1 - len(specials.prefix)
    examples = examples if examples is not None else [()] * len(queries)
    bodies = [split_query(t, p, q, ex)[0] for p, q, ex in zip(prompts, queries, examples, strict=True)]
    tails = [suffix_ids(tokenizer, _head(t, p), t.suffix) for p in prompts]
    ids = _ids(tokenizer, [b + t.suffix for b in bodies], room)
    out, n_cut = [], 0
    for body, tail in zip(ids, tails):
        if len(tail) >= room:
            raise ValueError(f"max_length={max_length} leaves no room for text before the suffix {t.suffix!r}")
        n_cut += len(body) > room
        if len(body) >= room:
            # A body that reaches the limit (cut, or exactly filling it) ends in the suffix's own
            # ids, as sentence-transformers' restore_suffix writes them over the last tokens.
            body = body[: room - len(tail)] + tail
        out.append([*specials.prefix, *body, specials.eos_id])
    return out, n_cut


def fit_queries(
    tokenizer,
    template: str | Template,
    prompts: Sequence[str | None],
    queries: Sequence[str],
    max_length: int,
    examples: Sequence[Sequence[ICLExample | tuple]] | None = None,
) -> tuple[list[str], int]:
    """Format and fit a list of queries (one prompt and one example list per query)."""
    t = get_template(template)
    examples = examples if examples is not None else [()] * len(queries)
    bodies = [split_query(t, p, q, ex)[0] for p, q, ex in zip(prompts, queries, examples, strict=True)]
    return fit_to_length(tokenizer, bodies, t.suffix, max_length)


def add_template_tokens(tokenizer, template: str | Template, embedding_size: int | None = None) -> bool:
    """Add the template's special tokens (``<instruct>``, ``<query>``, ``<response>``) to the tokenizer.

    Returns whether the model's input embedding matrix must grow (call
    ``model.resize_token_embeddings(len(tokenizer))`` then, and train and save the
    new rows): with ``embedding_size`` given, whether the vocabulary outgrew it;
    otherwise whether any token was new.
    """
    t = get_template(template)
    if not t.special_tokens:
        return False
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in t.special_tokens if tok not in vocab]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    if embedding_size is not None:
        return len(tokenizer) > embedding_size
    return added > 0


def check_template_tokens(tokenizer, template: str | Template) -> None:
    """A ValueError when the template's special tokens are not single tokens of this tokenizer."""
    t = get_template(template)
    for tok in t.special_tokens:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"template {t.name!r} needs {tok!r} as one token; call "
                "denselm.data.templates.add_template_tokens(tokenizer, template) and resize the embeddings"
            )


def _user_error(kind: str, message: str) -> ValueError:
    """denselm.errors' ``kind`` when the package is loaded, else a ValueError: importing
    ``denselm.errors`` here would import the package (and torch) when this file is used alone."""
    import sys

    errors = sys.modules.get("denselm.errors")
    return getattr(errors, kind)(message) if errors is not None else ValueError(message)
