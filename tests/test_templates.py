"""Query formats byte-exact against the seed's strings; the suffix survives truncation; added tokens."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from data_helpers import make_tokenizer
from denselm.data.templates import (
    ICLExample,
    add_template_tokens,
    check_template_tokens,
    fit_queries,
    fit_to_length,
    format_example,
    format_passage,
    format_query,
    truncate_text,
)
from denselm.data.tokenize import special_tokens, tokenize_with_eos

P = "Given a web search query, retrieve relevant passages that answer the query."


def test_plain_bge_icl_matches_the_seed():
    # FlagEmbedding: get_query_prompt(q, p, False) + '\nResponse:'
    assert format_query("bge-icl", P, "what is x") == f"Instruct: {P}\nQuery: what is x\nResponse:"
    # examples: '\nResponse: '.join((get_query_prompt(q1, p), p1)) + '\n\n', in order, before the query
    examples = [ICLExample(P, "q1", "r1"), ("other task", "q2", "r2")]
    assert format_query("bge-icl", P, "what is x", examples) == (
        f"Instruct: {P}\nQuery: q1\nResponse: r1\n\n"
        "Instruct: other task\nQuery: q2\nResponse: r2\n\n"
        f"Instruct: {P}\nQuery: what is x\nResponse:"
    )


def test_special_token_bge_icl_matches_the_seed():
    examples = [ICLExample(P, "q1", "r1")]
    assert format_query("bge-icl-special", P, "what is x") == f"<instruct>{P}\n<query>what is x\n<response>"
    assert format_query("bge-icl-special", P, "what is x", examples) == (
        f"<instruct>{P}\n<query>q1\n<response>r1\n\n<instruct>{P}\n<query>what is x\n<response>"
    )
    assert format_example("bge-icl-special", examples[0]) == f"<instruct>{P}\n<query>q1\n<response>r1\n\n"


def test_presets_and_passages():
    assert format_query("e5-mistral", "Retrieve", "how") == "Instruct: Retrieve\nQuery: how"
    assert format_query("qwen3-embedding", "Retrieve", "how") == "Instruct: Retrieve\nQuery:how"
    assert format_query("none", None, "how") == "how"
    assert format_query("none", "ignored", "how") == "how"
    assert format_passage("bge-icl", "text") == "text"
    assert format_passage("e5-mistral", "text", prefix="passage: ") == "passage: text"
    with pytest.raises(ValueError, match="template 'bge-icl' needs a prompt"):
        format_query("bge-icl", None, "how")
    with pytest.raises(ValueError, match="unknown template 'bert'"):
        format_query("bert", "p", "how")
    with pytest.raises(ValueError, match="template 'e5-mistral' has no in-context example format"):
        format_query("e5-mistral", "p", "how", [("p", "q", "r")])


def test_templates_module_does_not_import_torch():
    # load the file alone (the package __init__ imports the model, hence torch)
    path = importlib.util.find_spec("denselm.data.templates").origin
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('templates', {path!r})\n"
        "module = sys.modules['templates'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_suffix_survives_truncation():
    tok = make_tokenizer()
    sp = special_tokens(tok)
    long_query = " ".join(["banana cherry apple"] * 40)
    max_len = 30
    texts, n_cut = fit_queries(tok, "bge-icl", ["Given a query", "Given a query"], [long_query, "short"], max_len)
    assert n_cut == 1
    assert texts[1] == "Instruct: Given a query\nQuery: short\nResponse:"  # untouched when it fits
    assert texts[0].endswith("\nResponse:")
    assert texts[0].startswith("Instruct: Given a query\nQuery: banana cherry")
    full = format_query("bge-icl", "Given a query", long_query)
    assert full.startswith(texts[0][: -len("\nResponse:")])  # a prefix of the query was kept, nothing else changed
    ids = tokenize_with_eos(tok, texts, max_len)
    assert len(ids[0]) <= max_len and ids[0][0] == sp.prefix[0] and ids[0][-1] == sp.eos_id
    suffix_ids = tok("\nResponse:", add_special_tokens=False)["input_ids"]
    assert ids[0][-1 - len(suffix_ids) : -1] == suffix_ids  # the suffix tokens sit right before EOS
    # without fitting, the helper alone would cut the suffix away
    naive = tokenize_with_eos(tok, [full], max_len)[0]
    assert naive[-1 - len(suffix_ids) : -1] != suffix_ids


def test_fit_with_examples_and_special_tokens():
    tok = make_tokenizer()
    assert add_template_tokens(tok, "bge-icl-special") is True
    assert add_template_tokens(tok, "bge-icl-special") is False  # already there
    check_template_tokens(tok, "bge-icl-special")
    examples = [[ICLExample("task", "apple", "banana")]]
    texts, n_cut = fit_queries(tok, "bge-icl-special", ["task"], ["cherry " * 50], 30, examples)
    assert n_cut == 1
    assert texts[0].startswith("<instruct>task\n<query>apple\n<response>banana\n\n<instruct>task\n<query>cherry")
    assert texts[0].endswith("\n<response>")
    ids = tokenize_with_eos(tok, texts, 30)[0]
    assert len(ids) == 30 and ids[-2] == tok.convert_tokens_to_ids("<response>")


def test_added_tokens_and_embedding_size():
    tok = make_tokenizer()
    vocab = len(tok)
    with pytest.raises(ValueError, match="needs '<instruct>' as one token"):
        check_template_tokens(tok, "bge-icl-special")
    assert add_template_tokens(tok, "bge-icl") is False  # plain template adds nothing
    assert add_template_tokens(tok, "bge-icl-special", embedding_size=vocab + 8) is False  # spare rows
    assert len(tok) == vocab + 3
    assert add_template_tokens(tok, "bge-icl-special", embedding_size=vocab) is True
    assert [len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("<instruct>", "<query>", "<response>")] == [1, 1, 1]


def test_truncate_text_and_too_small_length():
    tok = make_tokenizer()
    text, cut = truncate_text(tok, "apple banana cherry grape lemon", 2)
    assert cut and "lemon" not in text and len(tok(text, add_special_tokens=False)["input_ids"]) <= 2
    assert truncate_text(tok, "apple", 10) == ("apple", False)
    with pytest.raises(ValueError, match="leaves no room for text before the suffix"):
        fit_to_length(tok, ["x"], "\nResponse:", 4)


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "smollm2-bos-eos"])
def test_real_tokenizers_keep_the_suffix_and_one_eos(name):
    from tokenizer_fixtures import fixture_tokenizer

    tok = fixture_tokenizer(name, fresh=True)
    sp = special_tokens(tok)
    max_len = 40
    queries = ["Où est la café? " * 30, "naïve 東京 query " * 20, "short one"]
    for template, suffix in (("bge-icl", "\nResponse:"), ("bge-icl-special", "\n<response>")):
        add_template_tokens(tok, template)
        texts, n_cut = fit_queries(tok, template, ["Find the answer"] * 3, queries, max_len)
        assert n_cut == 2 and all(t.endswith(suffix) for t in texts)
        assert texts[2] == format_query(template, "Find the answer", "short one")
        suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"]
        for ids in tokenize_with_eos(tok, texts, max_len):
            assert len(ids) <= max_len and ids[-1] == sp.eos_id and ids[: len(sp.prefix)] == list(sp.prefix)
            assert ids[-1 - len(suffix_ids) : -1] == suffix_ids
            assert ids.count(sp.eos_id) == 1 or sp.eos_id in sp.prefix  # exactly one EOS, at the end
