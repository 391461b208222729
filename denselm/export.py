"""`denselm export`: LoRA merged into plain weights, or a folder that sentence-transformers loads.

    denselm export --model out/model --output out/merged --format merged
    denselm export --model out/model --output out/st --format sentence-transformers

    from sentence_transformers import SentenceTransformer   # >= 6.3
    st = SentenceTransformer("out/st")
    q = st.encode_query(queries)       # template, instruction, suffix, query max length, EOS: as denselm
    d = st.encode_document(passages)   # passage prefix, passage max length, EOS

``merged``: the adapter folded into the base weights (``BiEncoderModel.save(merge_lora=True)``):
``config.json`` + ``model.safetensors`` + tokenizer, loadable by ``AutoModel`` and by denselm
(its ``denselm.json`` is kept).

``sentence-transformers``: the merged folder plus one ``Transformer`` module (the weights stored
once) -> ``Pooling`` (``lasttoken``, or mean/cls as trained) -> ``Normalize`` (when the model
normalises).  No custom code is loaded (no ``trust_remote_code``); it needs sentence-transformers
>= ``ST_MIN_VERSION``, written into ``config_sentence_transformers.json`` and the README:

- the routes: ``chat_template.jinja`` formats a text by the ``task`` that ``encode_query`` /
  ``encode_document`` pass to a template that declares it: a query becomes ``BOS + head(instruction)
  + text + suffix + EOS`` (bge-icl's ``"\nResponse:"`` included), a document ``BOS + passage_prefix +
  text + EOS``.  The rendered string is tokenized in one piece without added specials, so the
  suffix is tokenized together with the text (BPE merges across the boundary as in denselm) and
  BOS/EOS appear once.  A ``prompt=`` at encode time arrives as a system message and replaces the
  saved instruction, as denselm's ``prompt=`` does.
- max lengths: ``query_length`` / ``document_length`` in ``sentence_bert_config.json`` cut each route
  at its own limit; on truncation sentence-transformers writes the template tail (suffix + EOS) back
  over the last tokens (``restore_suffix``), so EOS is always last, as denselm appends it after
  cutting to ``max_len - 1``.
- the tokenizer itself also appends EOS (a ``TemplateProcessing`` post-processor ``[BOS] $A EOS``;
  ``add_bos_token``/``add_eos_token`` dropped from ``tokenizer_config.json``, which transformers would
  rebuild it from), for plain ``AutoTokenizer`` users and serving stacks; the export re-loads it and
  checks.  Padding side: left for the default ``end_aligned`` positions, right for ``from_zero``.

Exactness: token for token equal to denselm for every template (``none``, ``e5-mistral``,
``qwen3-embedding``, ``bge-icl``, ``bge-icl-special``), every passage and every query, cut or not:
a query of a suffix template that reaches its limit keeps its first ids and then the suffix's own
ids (``query_cut: token``, ``templates.fit_query_ids``), which is what sentence-transformers'
``restore_suffix`` writes.  One residue, for models trained with ``query_cut: retokenize`` (the
seed's way, and every model saved before denselm.json version 3): denselm decodes the kept tokens
and re-tokenizes them with the suffix, so where the cut falls inside a BPE merge (a ``?`` or a
space that would merge with ``"\n"``) one or two ids next to the suffix differ from the export's;
the export says so in its README and log.  In-context examples are not exported.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .errors import InputNotFound, OutputExists, UserError
from .io import atomic_folder
from .outputs import prepare_output

logger = logging.getLogger(__name__)

FORMATS = ("merged", "sentence-transformers", "onnx")
ST_POOLING = {"last": "lasttoken", "mean": "mean", "first": "cls"}
POOLING_FLAG = {"lasttoken": "lasttoken", "mean": "mean_tokens", "cls": "cls_token"}


# ------------------------------------------------------------------------------------ prompts


def st_prompts(template: str, instruction: str | None, passage_prefix: str = "") -> tuple[str, str, str]:
    """(query prompt, document prompt, query suffix that a prompt cannot express) for a template."""
    from denselm.data.templates import get_template

    t = get_template(template)
    if t.needs_prompt and instruction is None:
        raise UserError(
            f"template {t.name!r} formats queries with an instruction and the model has none saved; pass --instruction"
        )
    head = t.head.replace("{prompt}", instruction) if t.needs_prompt else t.head
    return head, passage_prefix or "", t.suffix


# ------------------------------------------------------------------------------------ tokenizer


def eos_post_processor(tokenizer, existing: dict | None) -> dict:
    """A ``tokenizers`` post-processor that wraps every sequence as ``prefix + $A + EOS``.

    ``prefix`` is what the tokenizer puts in front today (BOS for Llama-style, nothing for Qwen),
    found by ``denselm.data.tokenize.special_tokens``; ``existing`` byte-level steps (offset
    trimming) are kept in front of the template.
    """
    from denselm.data.tokenize import special_tokens

    specials = special_tokens(tokenizer)
    prefix = [(tokenizer.convert_ids_to_tokens(i), i) for i in specials.prefix]
    eos = (tokenizer.convert_ids_to_tokens(specials.eos_id), specials.eos_id)

    def seq(name: str, type_id: int) -> list[dict]:
        return ([{"SpecialToken": {"id": tok, "type_id": type_id}} for tok, _ in prefix]
                + [{"Sequence": {"id": name, "type_id": type_id}},
                   {"SpecialToken": {"id": eos[0], "type_id": type_id}}])

    template = {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {tok: {"id": tok, "ids": [i], "tokens": [tok]} for tok, i in [*prefix, eos]},
    }
    steps = (existing or {}).get("processors", [existing]) if existing else []
    keep = [p for p in steps if p and p.get("type") == "ByteLevel"]
    return {"type": "Sequence", "processors": [*keep, template]} if keep else template


def write_eos_tokenizer(folder: Path, tokenizer, padding_side: str) -> None:
    """Rewrite the saved tokenizer in ``folder`` so that calling it appends EOS (see module doc)."""
    tj_path, tc_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tj_path.is_file():
        raise UserError(
            f"{type(tokenizer).__name__} saved no tokenizer.json (not a fast tokenizer); "
            "the sentence-transformers export needs one to append EOS"
        )
    data = json.loads(tj_path.read_text(encoding="utf-8"))
    data["post_processor"] = eos_post_processor(tokenizer, data.get("post_processor"))
    tj_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")  # no indent: the C encoder, 10x faster
    config = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    for key in ("add_bos_token", "add_eos_token"):  # transformers rebuilds the post-processor from these
        config.pop(key, None)
    config["padding_side"] = padding_side
    tc_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def check_eos_tokenizer(folder: Path, tokenizer) -> None:
    """The exported tokenizer, loaded fresh, must give ``prefix + ids + [EOS]`` for any text."""
    from transformers import AutoTokenizer

    from denselm.data.tokenize import special_tokens

    want = special_tokens(tokenizer)
    loaded = AutoTokenizer.from_pretrained(folder)
    for text in ("x", "Hello world, how are you?", "a\nb"):
        body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        got = list(loaded(text)["input_ids"])
        expected = [*want.prefix, *body, want.eos_id]
        if got != expected:
            raise RuntimeError(
                f"exported tokenizer gives {got} for {text!r}, expected {expected} (prefix + text + EOS); "
                "this tokenizer class rewrites its post-processor on load"
            )


# ------------------------------------------------------------------------------------ export


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


ST_MIN_VERSION = "6.3"
"""Oldest sentence-transformers the folder is tested with: per-task ``query_length``/``document_length``,
chat templates that receive ``task``, and the template suffix restored on truncation (``restore_suffix``)."""


def _jinja_str(text: str) -> str:
    """``text`` as a Jinja string literal (JSON escaping is valid Jinja: backslash escapes, double quotes)."""
    return json.dumps(text, ensure_ascii=False)


def st_chat_template(spec, instruction: str | None, bos: str, eos: str) -> str:
    """The Jinja chat template that formats a text exactly as denselm does, for either route.

    sentence-transformers turns each text into ``[{"role": "user", "content": text}]`` (a ``prompt``
    becomes a leading ``system`` message) and renders this template with ``task`` = "query" or
    "document"; the rendered string is tokenized in one piece (``add_special_tokens=False``), so the
    query suffix is tokenized together with the text, as denselm tokenizes it.  ``bos``/``eos`` are
    the special tokens' texts (``bos`` empty where the tokenizer adds none).  A system message
    replaces the saved instruction for queries (denselm's ``prompt=``) and is ignored for documents.
    """
    from denselm.data.templates import get_template

    t = get_template(spec.template)
    head_before, _, head_after = t.head.partition("{prompt}") if t.needs_prompt else (t.head, "", "")
    default = instruction if instruction is not None else ""

    def content(var: str) -> str:  # flat (a string) or structured ([{"type": "text", "text": ...}]) message
        return (f"{{%- if {var}['content'] is string -%}}{{{{ {var}['content'] }}}}{{%- else -%}}"
                f"{{{{ {var}['content'] | map(attribute='text') | join('') }}}}{{%- endif -%}}")

    query_head = _jinja_str(head_before) + (" ~ ns.instruction ~ " + _jinja_str(head_after) if t.needs_prompt else "")
    return (
        "{#- denselm export: " + spec.template + " template; BOS/EOS as denselm adds them -#}\n"
        "{%- set ns = namespace(instruction=" + _jinja_str(default) + ") -%}\n"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- set ns.instruction = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') -%}"
        "{%- endfor -%}\n"
        "{%- for m in messages if m['role'] != 'system' -%}\n"
        "{{- " + _jinja_str(bos) + " -}}\n"
        "{%- if task is defined and task == 'query' -%}"
        "{{- " + query_head + " -}}" + content("m") + "{{- " + _jinja_str(t.suffix) + " -}}\n"
        "{%- else -%}"
        "{{- " + _jinja_str(spec.passage_prefix) + " -}}" + content("m") + "\n"
        "{%- endif -%}\n"
        "{{- " + _jinja_str(eos) + " -}}\n"
        "{%- endfor -%}\n"
    )


def write_st_files(folder: Path, model, instruction: str | None = None) -> dict:
    """Add the sentence-transformers files to a merged model folder; returns what the routes add to a text.

    One ``Transformer`` module (the backbone stored once) whose chat template formats queries and
    documents by ``task`` (``encode_query``/``encode_document`` set it), with per-task max lengths
    (``query_length``/``document_length``), then Pooling and Normalize.
    """
    from denselm.data.tokenize import special_tokens

    spec = model.spec
    prompt = instruction if instruction is not None else spec.prompt
    query_head, doc_prefix, suffix = st_prompts(spec.template, prompt, spec.passage_prefix)
    tokenizer = model.tokenizer
    specials = special_tokens(tokenizer)
    bos = "".join(tokenizer.convert_ids_to_tokens(list(specials.prefix)))
    eos = tokenizer.convert_ids_to_tokens(specials.eos_id)
    padding_side = "right" if spec.position_ids == "from_zero" else "left"
    # The tokenizer itself also appends EOS (for AutoTokenizer users and serving stacks that call it
    # plainly); the chat-template path tokenizes without special tokens, so EOS is there once either way.
    write_eos_tokenizer(folder, tokenizer, padding_side)
    check_eos_tokenizer(folder, tokenizer)
    (folder / "chat_template.jinja").write_text(st_chat_template(spec, prompt, bos, eos), encoding="utf-8")

    dim = int(json.loads((folder / "config.json").read_text())["hidden_size"])
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.Pooling"},
    ]
    if model.normalized:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.sentence_transformer.modules.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    # the pooling_mode_* flags are what older sentence-transformers and serving stacks (vLLM, TEI) read
    modes = {f"pooling_mode_{flag}": mode == ST_POOLING[model.pooling] for mode, flag in POOLING_FLAG.items()}
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim, "pooling_mode": ST_POOLING[model.pooling], **modes, "include_prompt": True,
    })
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    _write_json(folder / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        # with "message" present, ST converts every text input to a message rendered by the chat template
        "modality_config": {"text": forward, "message": {**forward, "format": "flat"}},
        "module_output_name": "token_embeddings",
        "query_length": spec.query_max_len,
        "document_length": spec.passage_max_len,
        # a plain encode() (no task) formats as a document; cap it at the passage limit
        "max_seq_length": spec.passage_max_len,
        "do_lower_case": False,
    })
    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": _versions(),
        "minimum_sentence_transformers_version": ST_MIN_VERSION,
        # empty prompts: the chat template formats each route; a prompt given at encode time becomes
        # the query instruction (a system message)
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if model.normalized else "dot",
    })
    return {"query_head": query_head, "query_suffix": suffix, "document_prefix": doc_prefix}


# ------------------------------------------------------------------------------------ model card


def training_metrics(model_folder: Path) -> tuple[dict, str] | None:
    """The last evaluation of the training run next to ``model_folder`` (``log.jsonl``'s ``eval/*`` keys),
    as ({metric: value}, where); None when the folder has no run log with an evaluation."""
    for log in (model_folder.parent / "log.jsonl", model_folder / "log.jsonl"):
        if not log.is_file():
            continue
        last = None
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("eval/") for k in record):
                last = record
        if last is not None:
            metrics = {k[len("eval/"):]: v for k, v in last.items() if k.startswith("eval/")}
            return metrics, f"{log.name}, step {last.get('step')}"
    return None


POSITION_NOTES = {
    "end_aligned": (
        "`end_aligned` (the seed's numbers): every row's last token sits at position T-1 of its padded "
        "batch (left padding and the default positions give this). It is batch-dependent: a text's absolute "
        "positions depend on the longest text in its batch. With rotary position embeddings (Llama, Qwen, "
        "Mistral) attention depends only on position differences, so the cost is floating-point noise "
        "(a test measures at most 1e-5 difference between a text alone and inside a batch of long texts); "
        "a model with absolute position embeddings would not be batch-independent. Training with `from_zero` "
        "instead cost nothing on denselm's demo recipe (pyfaq MRR@10 0.317 vs 0.308, 3 seeds), which is why "
        "new configs default to it."),
    "from_zero": ("`from_zero` (the default for new configs): positions start at 0 for every text; "
                  "batch-independent (padding on the right)."),
}


def model_card(model, fmt: str, *, source: Path | None = None, dtype: str = "fp32", instruction: str | None = None,
               extra_sections: str = "") -> str:
    """README.md of an export: YAML front matter, what turns a text into a vector, usage for each runtime."""
    from denselm.data.templates import get_template

    spec = model.spec
    t = get_template(spec.template)
    prompt = instruction if instruction is not None else spec.prompt
    query_head, doc_prefix, suffix = st_prompts(spec.template, prompt, spec.passage_prefix) if (
        prompt is not None or not t.needs_prompt) else (t.head, spec.passage_prefix, t.suffix)
    base = spec.base_model or "unknown"
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "denselm", "text-embeddings-inference"]
    front = ["---", f"base_model: {json.dumps(base)}", "library_name: " + {"sentence-transformers": "sentence-transformers",
             "onnx": "onnx"}.get(fmt, "transformers"), "pipeline_tag: sentence-similarity", "tags:"]
    front += [f"- {tag}" for tag in tags] + ["---", ""]
    metrics = training_metrics(source) if source is not None else None
    pooling = {"last": "last token (the EOS appended to every text)", "mean": "mean over real tokens",
               "first": "first token"}[spec.pooling]
    q_example = json.dumps(query_head + "{text}" + suffix, ensure_ascii=False)
    lines = [
        f"# {Path(str(base)).name} dense retriever (denselm export, {fmt}, {dtype})", "",
        "A decoder-only embedder trained with denselm. Every runtime below must "
        "reproduce the embedding denselm computes: the template, the EOS token, last-token pooling and the "
        "per-route max lengths are what matter.", "",
        "## What turns a text into a vector", "",
        "| | |", "|---|---|",
        f"| template | `{spec.template}` |",
        f"| query instruction | {json.dumps(prompt, ensure_ascii=False) if prompt is not None else '(none)'} |",
        f"| query format | `{q_example}` + EOS |",
        f"| query suffix (after the text, never truncated) | {json.dumps(suffix) if suffix else '(none)'} |",
        f"| passage format | `{json.dumps(doc_prefix + '{text}', ensure_ascii=False)}` + EOS |",
        f"| max lengths (tokens, BOS/EOS included) | queries {spec.query_max_len}, passages {spec.passage_max_len} |",
        *([f"| a query over its max length | {QUERY_CUT_NOTES[spec.query_cut]} |"] if suffix else []),
        f"| EOS | appended after cutting the text to max_len - 1 (`{model.tokenizer.eos_token}`, id {model.tokenizer.eos_token_id}) |",
        f"| pooling | {pooling} |",
        f"| normalised | {'yes (L2); similarity = cosine = dot product' if spec.normalized else 'no; similarity = dot product'} |",
        f"| positions | {POSITION_NOTES[spec.position_ids]} |",
        f"| padding side | {'left' if spec.position_ids == 'end_aligned' else 'right'} |",
        f"| dtype | {dtype} |", "",
        "Documents given as title + text are encoded as `title + ' ' + text`, as `denselm encode` does.", "",
    ]
    if metrics is not None:
        values, where = metrics
        lines += ["## Evaluation during training", "", f"From the training run's `{where}`:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in sorted(values.items())]
        lines += [""]
    lines += [
        "## Usage", "",
        "### denselm", "",
        "```python", "import denselm", 'enc = denselm.load_encoder("PATH")',
        "q = enc.encode_queries([\"how do I sort a dict by value?\"])",
        "d = enc.encode_corpus([{\"title\": \"dict\", \"text\": \"Use sorted(d.items(), key=...)\"}])",
        "scores = enc.similarity(q, d)", "```", "",
        "### Server (`denselm serve`, OpenAI-compatible)", "",
        "```bash", "denselm serve --model PATH --port 8000",
        "curl -s localhost:8000/v1/embeddings -H 'content-type: application/json' \\",
        "  -d '{\"input\": [\"how do I sort a dict?\"], \"model\": \"PATH\", \"input_type\": \"query\"}'", "```", "",
    ]
    lines += [extra_sections] if extra_sections else []
    lines += [
        "### vLLM and text-embeddings-inference (not run here)", "",
        "Neither runs on the machine this export was made on, so the lines below were NOT run or tested. "
        "Both call the tokenizer with its special tokens; this export's tokenizer appends EOS itself "
        "(checked when exporting), so the pooled token is the EOS denselm pools. Neither knows the query "
        "template: format queries yourself as in the table above (instruction, text, suffix), and keep "
        "the per-route max lengths (a query cut at the passage limit differs from denselm's).", "",
        "```bash",
        "# vLLM (>= 0.10: --runner pooling; older versions: --task embed --override-pooler-config)",
        f"vllm serve PATH --runner pooling --pooler-config "
        f"'{{\"pooling_type\": \"{ {'last': 'LAST', 'mean': 'MEAN', 'first': 'CLS'}[spec.pooling] }\", "
        f"\"normalize\": {'true' if spec.normalized else 'false'}}}' --max-model-len {spec.passage_max_len} "
        f"--dtype {EXPORT_DTYPES[dtype]}",
        "# text-embeddings-inference",
        f"text-embeddings-router --model-id PATH --pooling "
        f"{ {'last': 'last-token', 'mean': 'mean', 'first': 'cls'}[spec.pooling] } --dtype {EXPORT_DTYPES[dtype]} --auto-truncate",
        "```", "",
        f"Both apply one max length to every input (vLLM: `--max-model-len`, here the passage limit "
        f"{spec.passage_max_len}; TEI: the model's `max_position_embeddings`): cut queries to "
        f"{spec.query_max_len} and passages to {spec.passage_max_len} tokens (EOS included) on the client, "
        "keeping the query suffix after the cut, or use `denselm serve`, which does.", "",
        "### GGUF (llama.cpp): not exported", "",
        "llama.cpp is known to lose the appended EOS token (llama.cpp #14280), which last-token pooling reads, "
        "and its Python binding builds from source, which could not be done and tested here. Not provided.", "",
    ]
    return "\n".join(front + lines)


def transformers_snippet(model, instruction: str | None = None) -> str:
    """Plain transformers code (no denselm) that computes this model's embeddings; the export README
    shows it and a test runs it.  ``PATH`` is the export folder."""
    spec = model.spec
    prompt = instruction if instruction is not None else spec.prompt
    t_head, doc_prefix, suffix = st_prompts(spec.template, prompt, spec.passage_prefix)
    ids_code = IDS_RETOKENIZE if spec.query_cut == "retokenize" else IDS_TOKEN
    return f"""import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH")
model = AutoModel.from_pretrained("PATH").eval()
BOS = {list(_prefix_ids(model.tokenizer))}  # what the tokenizer puts in front (BOS, or nothing)
EOS = {model.tokenizer.eos_token_id}
QUERY_HEAD, QUERY_SUFFIX, PASSAGE_PREFIX = {json.dumps(t_head, ensure_ascii=False)}, {json.dumps(suffix)}, {json.dumps(doc_prefix, ensure_ascii=False)}
QUERY_MAX_LEN, PASSAGE_MAX_LEN = {spec.query_max_len}, {spec.passage_max_len}


{ids_code}

@torch.no_grad()
def embed(rows):
    width = max(map(len, rows))  # left padding: every row's EOS at the last position
    input_ids = torch.tensor([[EOS] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = {_positions_expr(spec.position_ids)}
    hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state  # (B, T, D)
    return {_pool_expr(spec.pooling, spec.normalized)}


queries = [ids(QUERY_HEAD + q, QUERY_MAX_LEN, QUERY_SUFFIX) for q in ["how do I sort a dict by value?"]]
passages = [ids(PASSAGE_PREFIX + p, PASSAGE_MAX_LEN) for p in ["Use sorted(d.items(), key=lambda kv: kv[1])."]]
q, d = embed(queries), embed(passages)
scores = q @ d.T
"""


IDS_TOKEN = '''def suffix_ids(suffix):
    """The suffix's ids after some text: the common tail of two renders (as sentence-transformers finds it)."""
    a, b = (tok(QUERY_HEAD + filler + suffix, add_special_tokens=False)["input_ids"] for filler in ("0", "1 2 3 4"))
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def ids(text, max_len, suffix=""):
    """BOS + text cut to max_len - 1 tokens + EOS; a cut text keeps the suffix's ids after it."""
    room = max_len - 1 - len(BOS)
    body = tok(text + suffix, add_special_tokens=False)["input_ids"]
    if suffix and len(body) >= room:  # cut the ids, then write the suffix's own ids
        tail = suffix_ids(suffix)
        body = body[: room - len(tail)] + tail
    return BOS + body[:room] + [EOS]
'''
"""Token ids as denselm builds them for ``query_cut: token`` (the default)."""

IDS_RETOKENIZE = '''def ids(text, max_len, suffix=""):
    """BOS + text cut to max_len - 1 tokens + EOS; a suffix is kept whole, tokenized with the text."""
    room = max_len - 1 - len(BOS)
    body = tok(text + suffix, add_special_tokens=False)["input_ids"]
    if suffix and len(body) > room:  # cut the text, decode it, re-tokenize it with the suffix
        cut = tok(text, add_special_tokens=False)["input_ids"]
        keep = room - len(tok(suffix, add_special_tokens=False)["input_ids"])
        while True:
            body = tok(tok.decode(cut[:keep], clean_up_tokenization_spaces=False) + suffix,
                       add_special_tokens=False)["input_ids"]
            if len(body) <= room or keep == 0:
                break
            keep = max(0, keep - (len(body) - room))
    return BOS + body[:room] + [EOS]
'''
"""Token ids as denselm builds them for ``query_cut: retokenize`` (the seed's way; models saved before it)."""


def _prefix_ids(tokenizer) -> tuple[int, ...]:
    from denselm.data.tokenize import special_tokens

    return special_tokens(tokenizer).prefix


def _positions_expr(policy: str) -> str:
    """The snippet's position ids for a left-padded batch: the model's policy (see the README table)."""
    if policy == "from_zero":
        return "(mask.cumsum(1) - 1).clamp(min=0)  # from_zero: every text starts at 0"
    return "torch.arange(width).expand(len(rows), width)  # end_aligned: the last token at width - 1"


def _pool_expr(pooling: str, normalized: bool) -> str:
    """The snippet's pooling line for a left-padded batch (``hidden`` (B, T, D), ``mask`` (B, T))."""
    norm = "F.normalize({}, dim=-1)" if normalized else "{}"
    expr = {
        "last": "hidden[:, -1]",
        "mean": "(hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)",
        "first": "hidden[torch.arange(len(rows)), mask.argmax(1)]",
    }[pooling]
    return norm.format(expr)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("sentence-transformers", "transformers", "torch"):
        try:
            out[dist.replace("-", "_").replace("torch", "pytorch")] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def load_model(path: str | os.PathLike, preset: str | None = None, base_model: str | None = None):
    """A BiEncoderModel on CPU from a denselm folder, or a plain folder with a preset."""
    from denselm.inference import load_encoder

    return load_encoder(path, device="cpu", preset=preset, base_model=base_model, show_progress=False).model


EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cast_weights(folder: Path, dtype: str) -> None:
    """Rewrite the floating-point tensors of ``folder``'s safetensors files in ``dtype`` (merged in fp32 first)."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, EXPORT_DTYPES[dtype])
    for path in sorted(folder.glob("*.safetensors")):
        tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes dtype, 4.x torch_dtype
        if key in config or key == "dtype":
            config[key] = EXPORT_DTYPES[dtype]
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export(model, output: str | os.PathLike, fmt: str, *, instruction: str | None = None, overwrite: bool = False,
           dtype: str = "fp32", source: str | os.PathLike | None = None, force: bool | None = None) -> Path:
    """Write ``model`` (a BiEncoderModel) to ``output`` in format ``fmt`` with a model card; atomic
    (temp folder, then rename).  ``dtype``: fp32, bf16 or fp16 weights (the LoRA is merged in the
    model's own dtype first).  ``source``: the model folder, whose training log gives the card's metrics.
    ``force`` is the old name of ``overwrite``."""
    overwrite = overwrite or bool(force)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExists(f"--output {output}: the folder exists; pass --overwrite to replace it, or choose another --output")
    if fmt in ("sentence-transformers", "onnx"):  # a missing instruction fails before anything is written
        st_prompts(model.spec.template, instruction if instruction is not None else model.spec.prompt)
    if instruction is not None:  # the export's denselm.json records the instruction its routes use
        model.spec = model.spec.replace(prompt=instruction)
    with atomic_folder(output, point="export") as stage:  # --overwrite: the old folder goes only once this is whole
        model.save(stage, merge_lora=True)
        if dtype != "fp32":
            cast_weights(stage, dtype)
        extra = ""
        if fmt == "sentence-transformers":
            write_st_files(stage, model, instruction)
            extra = ST_USAGE.format(min_version=ST_MIN_VERSION, cut_note=st_cut_note(model.spec))
        else:  # the merged tokenizer appends EOS too, so serving stacks that call it plainly pool EOS
            write_eos_tokenizer(stage, model.tokenizer, "right" if model.spec.position_ids == "from_zero" else "left")
            check_eos_tokenizer(stage, model.tokenizer)
        snippet = transformers_snippet(model, instruction)
        if fmt == "onnx":
            import torch

            from .onnx_export import export_onnx

            export_onnx(model, stage / "model.onnx", getattr(torch, EXPORT_DTYPES[dtype]))
            for weights in stage.glob("*.safetensors"):  # the graph holds the weights
                weights.unlink()
            tokenize = snippet.split("\n\n@torch.no_grad()")[0]  # the formatting and tokenizing half
            for line in ("import torch\n", "import torch.nn.functional as F\n",
                         'model = AutoModel.from_pretrained("PATH").eval()\n'):
                tokenize = tokenize.replace(line, "")
            extra = ONNX_USAGE.format(tokenize=tokenize.replace("AutoModel, AutoTokenizer", "AutoTokenizer").strip())
        else:
            extra += TRANSFORMERS_USAGE.format(snippet=snippet)
        card = model_card(model, fmt, source=Path(source) if source is not None else None, dtype=dtype,
                          instruction=instruction, extra_sections=extra)
        (stage / "README.md").write_text(card, encoding="utf-8")
    return output


QUERY_CUT_NOTES = {
    "token": "its first ids are kept, then the suffix's own ids (`query_cut: token`: what sentence-transformers' "
             "restore_suffix writes)",
    "retokenize": "its first ids are kept, decoded and tokenized again with the suffix (`query_cut: retokenize`, "
                  "the seed's way)",
}


def st_cut_note(spec) -> str:
    """What the ST export's README says about queries cut at their limit (and logs when not exact)."""
    from .data.templates import get_template

    if not get_template(spec.template).suffix:
        return "Queries and documents cut at their max length: token for token as denselm cuts them."
    if spec.query_cut == "token":
        return ("A query cut at its max length keeps the template's suffix: sentence-transformers writes "
                "the suffix's ids after the kept tokens, as this model was trained (`query_cut: token`).")
    note = ("This model was trained with `query_cut: retokenize` (the seed's way): a query cut at its max "
            "length can differ from denselm in one or two tokens next to the suffix (sentence-transformers "
            "writes the suffix's own ids; denselm re-tokenizes the cut text). Queries within the limit are exact.")
    logger.warning("export: %s", note.replace("`", ""))
    return note


ST_USAGE = """### sentence-transformers (>= {min_version})

```python
from sentence_transformers import SentenceTransformer
st = SentenceTransformer("PATH")
q = st.encode_query(["how do I sort a dict by value?"])   # template, instruction, suffix, query max length
d = st.encode_document(["Use sorted(d.items(), key=lambda kv: kv[1])."])
scores = st.similarity(q, d)
```

No arguments beyond the texts: the folder's chat template formats each route (`encode_query` /
`encode_document` pass `task`), each route has its own max length (`query_length`,
`document_length`), EOS is appended after truncation. `st.encode_query(texts, prompt="...")` replaces
the instruction. `mteb` 2.x calls `encode_query`/`encode_document` through this model unchanged.
{cut_note}

"""

ONNX_USAGE = """### ONNX Runtime (CPU)

One graph from token ids to the embedding: backbone, position ids (computed in the graph from
`attention_mask`), pooling and normalisation. Inputs `input_ids` and `attention_mask`, int64
`(batch, sequence)`, both axes dynamic; output `sentence_embedding`, float32 `(batch, dim)`. Pad on
the LEFT with any id (the mask marks padding; right padding gives the same numbers). Format and cut
the texts as the table above says; this code does it with the tokenizer of this folder:

```python
{tokenize}

import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession("PATH/model.onnx", providers=["CPUExecutionProvider"])


def embed(rows):
    width = max(map(len, rows))
    input_ids = np.array([[EOS] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    return sess.run(None, {{"input_ids": input_ids, "attention_mask": mask}})[0]


q = embed([ids(QUERY_HEAD + t, QUERY_MAX_LEN, QUERY_SUFFIX) for t in ["how do I sort a dict by value?"]])
d = embed([ids(PASSAGE_PREFIX + t, PASSAGE_MAX_LEN) for t in ["Use sorted(d.items(), key=lambda kv: kv[1])."]])
scores = q @ d.T
```

"""

TRANSFORMERS_USAGE = """### transformers (no denselm, no sentence-transformers)

```python
{snippet}```

"""


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    from denselm.spec import PRESETS

    parser.add_argument("--model", required=True, help="denselm output folder (LoRA or merged)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--format", default="merged", choices=FORMATS, help="merged (default), sentence-transformers or onnx")
    parser.add_argument("--instruction", default=None,
                        help="query instruction baked into the sentence-transformers 'query' prompt (default: the manifest's)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="template preset for a plain transformers folder without denselm.json")
    parser.add_argument("--base-model", default=None, help="base model folder of a LoRA adapter (default: the manifest's)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES),
                        help="weights' dtype (fp32 default; bf16/fp16 halve the size, cosine >= 0.999 to fp32)")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="replace --output if it exists (once the new folder is complete)")


def run(args) -> int:
    if not Path(args.model).is_dir():
        raise InputNotFound(f"--model {args.model}: no such folder")
    prepare_output(args.output, args.overwrite)  # refused if it exists, writable: before the model loads
    try:
        model = load_model(args.model, args.preset, args.base_model)
    except UserError as err:
        raise UserError(f"--model {args.model}: {err}") from None
    out = export(model, args.output, args.format, instruction=args.instruction, overwrite=args.overwrite,
                 dtype=args.dtype, source=args.model)
    logger.info("wrote %s (%s)", out, args.format)
    return 0
