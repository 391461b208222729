"""denselm.data.tokenize on real tokenizers: EOS exactly once, at the pooled position.

    OMP_NUM_THREADS=1 pytest tests/test_tokenize.py -q

Fixtures (tests/tokenizer_fixtures.py): GPT-2 BPE, Qwen3 (pad == eos, and the
chat config), SmolLM2 (pad == eos), SmolLM2 whose tokenizer adds BOS and EOS
itself (Llama-style ``add_eos_token``), and Gemma 3 (adds BOS) when its GGUF
package is installed.  The ids below were read off the real tokenizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from denselm.data.tokenize import (
    CUT_MARGIN,
    MIN_CHAR_BUDGET,
    SpecialTokens,
    bounded_ids,
    char_budget,
    encode_texts,
    longest_token_chars,
    pad_batch,
    special_tokens,
    tokenize_with_eos,
    truncate_with_eos,
)
from denselm.model.pooling import last_token_indices, last_token_pool
from tokenize_probe import KINDS, chunk
from tokenizer_fixtures import FIXTURE_NAMES, OPTIONAL_FIXTURE_NAMES, fixture_tokenizer


@dataclass(frozen=True)
class Facts:
    prefix: tuple[int, ...]  # what the tokenizer puts before a text (BOS)
    eos: int
    pad: int
    hello_world: tuple[int, ...]  # "Hello world" without special tokens


FACTS = {
    "gpt2": Facts((), 50256, 50256, (15496, 995)),  # no pad token: falls back to eos
    "qwen3": Facts((), 151643, 151643, (9707, 1879)),  # pad == eos == <|endoftext|>
    "qwen3-chat": Facts((), 151645, 151643, (9707, 1879)),  # eos <|im_end|>, pad <|endoftext|>
    "smollm2": Facts((), 2, 2, (19556, 905)),  # pad == eos == <|im_end|>; BOS not added
    "smollm2-bos-eos": Facts((1,), 2, 2, (19556, 905)),  # tokenizer adds <|im_start|> ... <|im_end|>
    "gemma3": Facts((2,), 1, 0, (9259, 1902)),  # <bos> added; eos <eos>, pad <pad>
}
NAMES = FIXTURE_NAMES + OPTIONAL_FIXTURE_NAMES
SIDES = ("left", "right")
MAX_LEN = 16
LONG = "A longer passage about dense retrieval with decoder-only language models. " * 20
TEXTS = ["Hello world", "", LONG, "naïve café — 你好, 12345!\n\tnew line", "x"]


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


@pytest.fixture
def tok(name):
    return fixture_tokenizer(name)  # skips gemma3 when its package is not installed


def real_rows(batch) -> list[list[int]]:
    """Each row's ids where the attention mask is 1."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_fixture_facts(name, tok):
    facts = FACTS[name]
    assert special_tokens(tok) == SpecialTokens(prefix=facts.prefix, eos_id=facts.eos, pad_id=facts.pad)
    assert tuple(tok("Hello world", add_special_tokens=False)["input_ids"]) == facts.hello_world
    assert tokenize_with_eos(tok, ["Hello world"], MAX_LEN) == [[*facts.prefix, *facts.hello_world, facts.eos]]


@pytest.mark.parametrize("side", SIDES)
def test_each_row_ends_with_one_eos_at_the_pooled_position(name, tok, side):
    facts = FACTS[name]
    batch = encode_texts(tok, TEXTS, max_length=MAX_LEN, padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    assert B == len(TEXTS) and T <= MAX_LEN and ids.dtype == torch.long
    room = MAX_LEN - 1 - len(facts.prefix)
    lengths = mask.sum(dim=1)
    assert T == int(lengths.max())

    for row, (text, real) in enumerate(zip(TEXTS, real_rows(batch))):
        n = len(real)
        # The mask is one block of ones against the padding side.
        block = [0] * (T - n) + [1] * n if side == "left" else [1] * n + [0] * (T - n)
        assert mask[row].tolist() == block, f"row {row}"
        assert n <= MAX_LEN
        assert real[-1] == facts.eos and real.count(facts.eos) == 1, f"row {row}: {real}"
        assert tuple(real[: len(facts.prefix)]) == facts.prefix
        for bos in facts.prefix:
            assert real.count(bos) == 1
        # Truncation keeps the start of the text.
        full = tok(text, add_special_tokens=False)["input_ids"]
        assert real[len(facts.prefix) : -1] == full[:room]

    # The long text was cut to exactly max_length, and what is left is its beginning.
    long_real = real_rows(batch)[TEXTS.index(LONG)]
    assert len(long_real) == MAX_LEN
    assert LONG.startswith(tok.decode(long_real[len(facts.prefix) : -1]).strip())

    # The position last-token pooling reads holds EOS, per row, for either side.
    idx = last_token_indices(mask)
    expected_idx = torch.full((B,), T - 1) if side == "left" else lengths - 1
    assert torch.equal(idx, expected_idx)
    assert (ids[torch.arange(B), idx] == facts.eos).all()
    pooled = last_token_pool(ids.unsqueeze(-1).double(), mask).squeeze(-1)  # hidden state = the id
    assert pooled.tolist() == [float(facts.eos)] * B


def test_left_and_right_padding_hold_the_same_tokens(tok):
    left = encode_texts(tok, TEXTS, MAX_LEN, padding_side="left")
    right = encode_texts(tok, TEXTS, MAX_LEN, padding_side="right")
    assert left["input_ids"].shape == right["input_ids"].shape
    assert real_rows(left) == real_rows(right)
    assert torch.equal(left["attention_mask"].sum(1), right["attention_mask"].sum(1))


@pytest.mark.parametrize("pad_eq_eos", ["qwen3", "smollm2"])
@pytest.mark.parametrize("side", SIDES)
def test_pad_equal_to_eos_only_the_mask_marks_the_real_eos(pad_eq_eos, side):
    tok = fixture_tokenizer(pad_eq_eos)
    eos = FACTS[pad_eq_eos].eos
    assert special_tokens(tok).pad_id == eos
    batch = encode_texts(tok, ["Hi", LONG], MAX_LEN, padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    T = ids.shape[1]
    n = len(tokenize_with_eos(tok, ["Hi"], MAX_LEN)[0])
    assert n < T and int(mask[0].sum()) == n
    # Row 0: the real EOS and the padding are the same id, so ids alone cannot locate it;
    # of its T - n + 1 EOS ids, the mask marks exactly one.
    is_eos = ids[0] == eos
    assert int(is_eos.sum()) == T - n + 1
    assert int((is_eos & mask[0].bool()).sum()) == 1
    idx = last_token_indices(mask)
    assert idx.tolist() == ([T - 1, T - 1] if side == "left" else [n - 1, T - 1])
    assert mask[0, idx[0]] == 1 and ids[0, idx[0]] == eos
    if side == "right":  # the id-based guess is off by one: it takes the real EOS for padding
        assert int((ids[0] != special_tokens(tok).pad_id).sum()) - 1 == n - 2


OWN_EOS_CASES = [pytest.param((n, True), id=f"{n}-add_eos_token") for n in NAMES]
OWN_EOS_CASES.append(pytest.param(("smollm2-bos-eos", False), id="smollm2-bos-eos"))


@pytest.mark.parametrize("loaded", OWN_EOS_CASES)
def test_tokenizer_that_appends_eos_itself_is_not_doubled(loaded):
    name, add_eos_kwarg = loaded
    tok = fixture_tokenizer(name, add_eos_token=True) if add_eos_kwarg else fixture_tokenizer(name)
    eos = FACTS[name].eos
    own = tok("Hello world")["input_ids"]
    assert own[-1] == eos  # the tokenizer does append EOS itself (transformers 5 honours the flag)
    ours = tokenize_with_eos(tok, ["Hello world", LONG], MAX_LEN)
    # Ours equals the tokenizer's own output where it fits, and never holds a second EOS.
    assert ours[0] == own
    assert [row.count(eos) for row in ours] == [1, 1]
    assert len(ours[1]) == MAX_LEN and ours[1][-1] == eos


def test_max_length_too_small_raises(name, tok):
    facts = FACTS[name]
    with pytest.raises(ValueError, match="max_length=%d" % (1 + len(facts.prefix))):
        tokenize_with_eos(tok, ["Hello world"], max_length=1 + len(facts.prefix))
    smallest = tokenize_with_eos(tok, ["Hello world"], max_length=2 + len(facts.prefix))
    assert smallest == [[*facts.prefix, facts.hello_world[0], facts.eos]]


def test_empty_text_is_prefix_plus_eos(name, tok):
    facts = FACTS[name]
    assert tokenize_with_eos(tok, [""], MAX_LEN) == [[*facts.prefix, facts.eos]]
    for side in SIDES:
        batch = encode_texts(tok, ["", "Hello world"], MAX_LEN, padding_side=side)
        n_empty, n_hello = len(facts.prefix) + 1, len(facts.prefix) + 3
        assert batch["input_ids"].shape == (2, n_hello)
        assert batch["attention_mask"].sum(1).tolist() == [n_empty, n_hello]
        idx = last_token_indices(batch["attention_mask"])
        assert batch["input_ids"][torch.arange(2), idx].tolist() == [facts.eos, facts.eos]


def test_return_truncated_counts_cut_texts(name, tok):
    p = len(FACTS[name].prefix)
    # "Hello world" is 2 tokens in every fixture: room for 2 keeps it whole, room for 1 cuts it.
    ids, cut = tokenize_with_eos(tok, ["Hello world", LONG], max_length=p + 3, return_truncated=True)
    assert cut == 1 and [len(r) for r in ids] == [p + 3, p + 3]
    _, cut = tokenize_with_eos(tok, ["Hello world", LONG], max_length=p + 2, return_truncated=True)
    assert cut == 2


@pytest.mark.parametrize("side", SIDES)
def test_pad_to_multiple_of_on_real_tokenizer(name, tok, side):
    facts = FACTS[name]
    batch = encode_texts(tok, ["Hello world", "x"], MAX_LEN, padding_side=side, pad_to_multiple_of=8)
    n = len(facts.prefix) + 3
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].sum() == n
    idx = last_token_indices(batch["attention_mask"])
    assert idx[0] == (7 if side == "left" else n - 1)
    assert (batch["input_ids"][torch.arange(2), idx] == facts.eos).all()
    pads = batch["input_ids"][batch["attention_mask"] == 0]
    assert (pads == facts.pad).all()


def test_a_single_string_is_refused():
    with pytest.raises(TypeError, match="list of texts"):
        tokenize_with_eos(fixture_tokenizer("gpt2"), "one text", MAX_LEN)


# ----------------------------------------------------------------------------- pad_batch, worked by hand


def test_pad_batch_left_and_right():
    seqs = [[5, 6, 7], [8]]
    left = pad_batch(seqs, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    right = pad_batch(seqs, pad_id=9, padding_side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left["input_ids"].dtype == torch.long and left["attention_mask"].dtype == torch.long
    assert last_token_indices(left["attention_mask"]).tolist() == [2, 2]
    assert last_token_indices(right["attention_mask"]).tolist() == [2, 0]


def test_pad_batch_pad_to_multiple_of():
    seqs = [[5, 6, 7], [8]]
    left = pad_batch(seqs, pad_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    right = pad_batch(seqs, pad_id=0, padding_side="right", pad_to_multiple_of=4)
    assert right["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert pad_batch([[1, 2, 3, 4]], 0, pad_to_multiple_of=4)["input_ids"].shape == (1, 4)  # already a multiple
    assert pad_batch([[1]], 0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_pad_batch_bad_input():
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch([[1]], 0, padding_side="middle")
    with pytest.raises(ValueError, match="no sequences"):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_batch([[1], []], 0)


# ----------------------------------------------------------------------------- bounded cost per text
#
# Only a character prefix of a long text is tokenized (bounded_ids); these tests check that the ids
# are exactly the whole text's, on SmolLM2's real tokenizer, a SentencePiece-style one (NFKC, the whole
# text one BPE sequence, byte fallback) and GPT-2's byte-level BPE, and that time and memory no longer
# grow with the text.

CUT_FIXTURES = ("smollm2", "sentencepiece", "gpt2")


def whole_path(tok, texts, max_length):
    """The old path: tokenize each text whole, then cut (the reference the bounded path must equal)."""
    specials = special_tokens(tok)
    return [truncate_with_eos(b, specials, max_length) for b in tok(list(texts), add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("fixture", CUT_FIXTURES)
def test_char_budget_covers_the_kept_tokens(fixture):
    tok = fixture_tokenizer(fixture)
    longest = longest_token_chars(tok)
    assert longest == max(len(t) for t in tok.get_vocab())
    assert longest_token_chars(tok) == longest  # cached on the tokenizer
    assert char_budget(tok, 63) == max(MIN_CHAR_BUDGET, longest * (63 + CUT_MARGIN))


def test_longest_token_is_recomputed_when_tokens_are_added():
    tok = fixture_tokenizer("gpt2", fresh=True)
    before = longest_token_chars(tok)
    tok.add_tokens(["<" + "x" * (before + 10) + ">"], special_tokens=True)
    assert longest_token_chars(tok) == before + 12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fixture", CUT_FIXTURES)
def test_long_text_ids_equal_the_whole_text_ids(fixture, kind):
    tok = fixture_tokenizer(fixture)
    text = chunk(kind)[:50_000]  # several times the budget, whole-text path still quick
    mixed = " ".join(chunk(k)[:15_000] for k in KINDS) + " a short tail"
    texts = [text, mixed, "Hello world", ""]
    specials = special_tokens(tok)
    whole = tok(texts, add_special_tokens=False)["input_ids"]  # tokenized once, cut to each length
    for max_length in (2, 16, 64, 512):
        expected = [truncate_with_eos(b, specials, max_length) for b in whole]
        assert tokenize_with_eos(tok, texts, max_length) == expected, max_length
    # The first cut was enough: the ids come from a prefix, not the whole text.
    budget = char_budget(tok, 63)
    assert len(text) > 4 * budget
    ids = bounded_ids(tok, [text], 63)[0]
    assert 63 + CUT_MARGIN <= len(ids) < len(tok(text, add_special_tokens=False)["input_ids"])


def spy_tokenizer(name: str, calls: list):
    """A fresh fixture tokenizer that records the character length of every text it is called on."""
    tok = fixture_tokenizer(name, fresh=True)
    real_call = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **kw):
            calls.append([len(t) for t in ([text] if isinstance(text, str) else text)])
            return real_call(self, text, *a, **kw)

    tok.__class__ = Spy
    return tok


def test_a_cut_with_too_few_tokens_doubles_the_budget():
    """Many characters per token: the first cut yields too few ids, so the budget doubles until it does."""
    calls: list = []
    spy = spy_tokenizer("sentencepiece", calls)
    text = "dense " * 400 + "x"  # '▁dense' is one token: 6 characters per id
    ids = bounded_ids(spy, [text], 300, budget=600)[0]
    # cuts of 600, 1200, 2400 characters, each moved back before its last space: 100, 200, then 400 >= 316 ids
    assert [c[0] for c in calls] == [599, 1199, 2399]
    assert ids[:300] == fixture_tokenizer("sentencepiece")(text, add_special_tokens=False)["input_ids"][:300]
    calls.clear()
    short = "dense " * 50
    assert bounded_ids(spy, [short], 300, budget=100)[0] == spy(short, add_special_tokens=False)["input_ids"]
    assert [c[0] for c in calls[:-1]] == [95, 197, 300]  # the third cut is the whole text: exact, accepted


SAMPLE_ALPHABET = st.characters(blacklist_categories=("Cs",))  # any code point a str can hold in UTF-8
PIECES = st.sampled_from(["dense", " retrieval", "  ", "\n", "你好", "世界", "👨\u200d👩\u200d👧", "👍🏽", "e\u0301",
                          "ﬁ", "①", "Hello", "<|im_end|>", "<s>", "\t", "123", "...", "=="])


@pytest.mark.parametrize("fixture", CUT_FIXTURES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_cut_path_equals_whole_path(fixture, data):
    """Random texts, kept lengths and (small) first budgets: the kept ids never differ from the whole text's."""
    tok = fixture_tokenizer(fixture)
    parts = data.draw(st.lists(st.one_of(st.text(SAMPLE_ALPHABET, max_size=12), PIECES), max_size=80))
    text = "".join(parts)
    keep = data.draw(st.integers(0, 40), label="keep")
    budget = data.draw(st.integers(1, max(1, len(text))), label="budget")
    whole = tok(text, add_special_tokens=False)["input_ids"]
    cut = bounded_ids(tok, [text], keep, budget=budget)[0]
    assert cut[:keep] == whole[:keep]
    assert (len(cut) > keep) == (len(whole) > keep)  # "was it truncated" is answered the same way


@pytest.mark.parametrize("fixture", CUT_FIXTURES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_tokenize_with_eos_equals_whole_path(fixture, data):
    """The public call, default budget, texts around the budget's length."""
    tok = fixture_tokenizer(fixture)
    max_length = data.draw(st.integers(2, 48), label="max_length")
    room = max_length - 1 - len(special_tokens(tok).prefix)
    budget = char_budget(tok, room)
    unit = data.draw(st.lists(st.one_of(st.text(SAMPLE_ALPHABET, min_size=1, max_size=6), PIECES), min_size=1, max_size=10))
    unit = "".join(unit) or "x"
    n = data.draw(st.integers(budget // 2, budget * 2), label="length")
    text = (unit * (n // len(unit) + 1))[:n]
    assert tokenize_with_eos(tok, [text], max_length) == whole_path(tok, [text], max_length)


def run_probe(fixture: str, kind: str, mb: float, max_len: int = 64) -> dict:
    """tests/tokenize_probe.py in a fresh process (peak RSS is per process; see its docstring)."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "tokenize_probe.py"), "--fixture", fixture, "--kind", kind,
         "--mb", str(mb), "--max-len", str(max_len)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_five_megabytes_cost_what_a_short_text_costs():
    """One 5 MB passage: it took 15-20 s and 660-940 MB of peak memory whole (issue 11)."""
    r = run_probe("smollm2", "cjk", 5)
    tok = fixture_tokenizer("smollm2")
    assert r["ids"] == whole_path(tok, [chunk("cjk")[:100_000]], 64)[0]
    assert r["seconds"] < 1.0, r
    assert r["rss_mb"] < 100, r


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fixture", CUT_FIXTURES)
def test_fifty_megabytes_in_under_a_second_and_100_mb(fixture, kind):
    """50 MB without a space (one pre-token): exact ids, < 1 s, < 100 MB over the baseline.

    The whole-text reference is the text's first MiB (the 50 MB text repeats it): tokenizing
    50 MB whole takes minutes and gigabytes, which is the point of the bounded path.
    """
    tok = fixture_tokenizer(fixture)
    specials = special_tokens(tok)
    whole = tok(chunk(kind), add_special_tokens=False)["input_ids"]  # the first MiB, tokenized whole once
    for max_len in (64, 512):
        r = run_probe(fixture, kind, 50, max_len)
        assert r["chars"] >= 50 * 2**20 // 4
        assert r["ids"] == truncate_with_eos(whole, specials, max_len), max_len
        assert r["seconds"] < 1.0, r
        assert r["rss_mb"] < 100, r


# ----------------------------------------------------------------------------- callers: train collation, inference

BIG = 5 * 2**20  # characters


def _collate(tok, query_text, passages, spec="normal", **cfg):
    from denselm.data.collate import Group, collate_groups
    from denselm.data.config import DataConfig
    from denselm.data.formats import TASK_TYPES

    base = dict(train_data=["unused.jsonl"], prompt="Given a query", group_size=len(passages), num_workers=0,
                query_max_len=48, passage_max_len=40, template="bge-icl")
    groups = [Group(query_text, None, list(passages), None, passages[0]),
              Group("a short query", None, ["short positive"] + ["short negative"] * (len(passages) - 1), None, "x")]
    if cfg.get("icl_max_examples"):
        groups[1].examples = [0]  # the huge pair is the short query's in-context example
    base.update(cfg)
    return collate_groups(groups, tok, DataConfig(**base), TASK_TYPES[spec], TASK_TYPES[spec].mode, "d.jsonl")


def _whole_text_budget(monkeypatch):
    """Make bounded_ids tokenize every text whole: the old path, for reference."""
    import denselm.data.tokenize as tokenize

    monkeypatch.setattr(tokenize, "char_budget", lambda tokenizer, keep: 2**62)


@pytest.mark.parametrize("spec", ["normal", "symmetric_sts"])
def test_collation_of_a_five_megabyte_text_tokenizes_a_bounded_prefix(spec):
    """Train collation (queries with template and suffix, passages, ICL examples) never hands the tokenizer a huge text."""
    calls: list = []
    tok = spy_tokenizer("smollm2", calls)
    texts = [chunk(k) * (BIG // len(chunk(k))) for k in KINDS]  # 5 MiB-ish each, no spaces
    icl = dict(icl_max_examples=1, query_max_len=320, icl_token_budget=250) if spec == "normal" else {}
    t0 = time.perf_counter()
    batch = _collate(tok, texts[0], texts[1:], spec, **icl)
    seconds = time.perf_counter() - t0
    longest_call = max(n for c in calls for n in c)
    assert longest_call < 50_000, longest_call  # budget for 48 tokens is 81 * 64 characters (a few doublings at most)
    assert seconds < 2.0, seconds  # the whole-text path: about 15 s per 5 MB text on this machine
    sp = special_tokens(tok)
    suffix = tok("\nResponse:", add_special_tokens=False)["input_ids"]
    rows = real_rows(batch.query)
    assert len(rows[0]) == (320 if icl else 48) and rows[0][-1] == sp.eos_id and rows[0][-1 - len(suffix) : -1] == suffix  # suffix kept
    assert batch.num_truncated_queries == 1 and batch.num_truncated_passages == 2
    if spec == "normal":
        assert batch.num_icl_examples == 1
        assert tok.decode(rows[1]).startswith("Instruct: Given a query\nQuery: " + texts[0][:10])


@pytest.mark.parametrize("spec", ["normal", "symmetric_sts"])
def test_collation_equals_the_whole_text_path(spec, monkeypatch):
    """Same tensors as tokenizing every text whole (texts of 12k+ characters: twice the budget and more)."""
    tok = fixture_tokenizer("smollm2")
    texts = [chunk(k)[:12_000] for k in KINDS] + [" ".join(chunk(k)[:5_000] for k in KINDS)]
    icl = dict(icl_max_examples=1, query_max_len=320, icl_token_budget=250) if spec == "normal" else {}
    bounded = [_collate(tok, q, texts[:3], spec, **icl) for q in texts]
    _whole_text_budget(monkeypatch)
    whole = [_collate(tok, q, texts[:3], spec, **icl) for q in texts]
    for b, w in zip(bounded, whole):
        for part in ("query", "passage"):
            for key in ("input_ids", "attention_mask"):
                assert torch.equal(getattr(b, part)[key], getattr(w, part)[key]), (part, key)
        assert b.stats() == w.stats()


def test_inference_encoder_tokenizes_a_bounded_prefix(monkeypatch):
    """encode, evaluate and mine all build ids through Encoder.query_ids / passage_ids."""
    from types import SimpleNamespace

    from denselm.inference import Encoder

    calls: list = []
    tok = spy_tokenizer("smollm2", calls)
    manifest = {"template": "bge-icl", "prompt": "Given a query", "query_max_len": 48, "passage_max_len": 40}
    enc = Encoder(SimpleNamespace(manifest=manifest), tokenizer=tok)
    texts = [chunk(k) * (BIG // len(chunk(k))) for k in KINDS]
    t0 = time.perf_counter()
    q_ids, p_ids = enc.query_ids(texts), enc.passage_ids(texts)
    assert time.perf_counter() - t0 < 2.0
    assert max(n for c in calls for n in c) < 50_000
    # queries: up to 48 (decoding the cut and re-tokenizing may merge one token fewer in), suffix and EOS last
    suffix = tok("\nResponse:", add_special_tokens=False)["input_ids"]
    assert all(46 <= len(x) <= 48 and x[-1 - len(suffix):] == [*suffix, special_tokens(tok).eos_id] for x in q_ids)
    assert [len(x) for x in p_ids] == [40] * 3
    # equal to the whole-text path on texts it can afford
    small = [t[:20_000] for t in texts]
    bounded = (enc.query_ids(small), enc.passage_ids(small))
    _whole_text_budget(monkeypatch)
    assert (enc.query_ids(small), enc.passage_ids(small)) == bounded
