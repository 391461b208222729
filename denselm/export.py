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
``qwen3-embedding``, ``bge-icl``, ``bge-icl-special``) for every passage and for every query within
the query limit.  One residue: a bge-icl query cut at the limit.  denselm decodes the kept tokens and
re-tokenizes them with the suffix (``templates.fit_to_length``); sentence-transformers writes the
suffix's own ids over the last kept tokens.  Where the cut falls inside a BPE merge (a ``?`` or a
space that would merge with ``"\n"``, a word split mid-piece) one or two ids next to the suffix
differ.  Suffix-free templates have no such residue.  In-context examples are not exported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("merged", "sentence-transformers")
ST_POOLING = {"last": "lasttoken", "mean": "mean", "first": "cls"}


# ------------------------------------------------------------------------------------ prompts


def st_prompts(template: str, instruction: str | None, passage_prefix: str = "") -> tuple[str, str, str]:
    """(query prompt, document prompt, query suffix that a prompt cannot express) for a template."""
    from denselm.data.templates import get_template

    t = get_template(template)
    if t.needs_prompt and instruction is None:
        raise ValueError(
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
        raise ValueError(
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
    _write_json(folder / "1_Pooling" / "config.json", {
        "embedding_dimension": dim, "pooling_mode": ST_POOLING[model.pooling], "include_prompt": True,
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


def export(model, output: str | os.PathLike, fmt: str, *, instruction: str | None = None, force: bool = False) -> Path:
    """Write ``model`` (a BiEncoderModel) to ``output`` in format ``fmt``; atomic (temp folder, then rename)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    output = Path(output)
    if output.exists() and not force:
        raise ValueError(f"--output {output} exists; pass --force to replace it")
    if fmt == "sentence-transformers":  # a missing instruction fails before anything is written
        st_prompts(model.spec.template, instruction if instruction is not None else model.spec.prompt)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent)) / "model"
    if instruction is not None:  # the export's denselm.json records the instruction its routes use
        model.spec = model.spec.replace(prompt=instruction)
    try:
        model.save(stage, merge_lora=True)
        if fmt == "sentence-transformers":
            write_st_files(stage, model, instruction)
        if output.exists():  # --force: swap the old folder aside, then delete it
            old = stage.parent / "old"
            os.replace(output, old)
        os.replace(stage, output)
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)
    return output


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    from denselm.spec import PRESETS

    parser.add_argument("--model", required=True, help="denselm output folder (LoRA or merged)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--format", default="merged", choices=FORMATS, help="merged (default) or sentence-transformers")
    parser.add_argument("--instruction", default=None,
                        help="query instruction baked into the sentence-transformers 'query' prompt (default: the manifest's)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="template preset for a plain transformers folder without denselm.json")
    parser.add_argument("--base-model", default=None, help="base model folder of a LoRA adapter (default: the manifest's)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")


def run(args) -> int:
    from denselm.cli import CliError

    if not Path(args.model).is_dir():
        raise CliError(f"--model {args.model}: no such folder")
    if Path(args.output).exists() and not args.force:
        raise CliError(f"--output {args.output} exists; pass --force to replace it")
    try:
        model = load_model(args.model, args.preset, args.base_model)
    except ValueError as err:
        raise CliError(f"--model {args.model}: {err}") from None
    out = export(model, args.output, args.format, instruction=args.instruction, force=args.force)
    logger.info("wrote %s (%s)", out, args.format)
    return 0
