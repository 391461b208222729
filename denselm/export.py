"""`denselm export`: LoRA merged into plain weights, or a folder that sentence-transformers loads.

    denselm export --model out/model --output out/merged --format merged
    denselm export --model out/model --output out/st --format sentence-transformers

    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer("out/st")
    q = st.encode(queries, prompt_name="query")       # (or st.encode_query(queries) on ST >= 5)
    d = st.encode(passages, prompt_name="document")

``merged``: the adapter folded into the base weights (``BiEncoderModel.save(merge_lora=True)``):
``config.json`` + ``model.safetensors`` + tokenizer, loadable by ``AutoModel`` and by denselm
(its ``denselm.json`` is kept).

``sentence-transformers``: the merged folder plus ``modules.json`` (Transformer -> Pooling
``lasttoken`` (or mean/cls, as trained) -> Normalize when the model normalises),
``config_sentence_transformers.json`` (prompts ``query`` = the template's text before the query
with the instruction filled in, ``document`` = the passage prefix; cosine or dot similarity) and
``sentence_bert_config.json`` (``max_seq_length`` = the passage limit), in the classic layout
that all-MiniLM-L6-v2 ships (tested with sentence-transformers 6.2).

EOS: sentence-transformers calls the tokenizer itself, so the exported ``tokenizer.json`` gets a
``TemplateProcessing`` post-processor ``[BOS] $A EOS`` (BOS only where the tokenizer adds one;
a byte-level offsets step is kept) and ``add_bos_token``/``add_eos_token`` are dropped from
``tokenizer_config.json`` (transformers would rebuild the post-processor from them). The export
re-loads the tokenizer and checks that every text ends in exactly one EOS. The padding side is
left for the default ``end_aligned`` positions (the numbers denselm computes), right for ``from_zero``.

Exactness and limits:
- templates ``none``, ``e5-mistral``, ``qwen3-embedding``: exact. ST tokenizes ``prompt + text``
  as one string, as denselm does, so no token merges differently at the boundary.
- ``bge-icl`` / ``bge-icl-special`` put a suffix after the query (``"\\nResponse:"``). A
  sentence-transformers prompt is a prefix only, and a tokenizer post-processor would append
  the suffix to documents too (they share the tokenizer) and, appended as fixed token ids, is
  not exact for BPE either: Qwen's pre-tokenizer makes ``"?\\n"`` one piece, so a question
  ending in ``?`` tokenizes differently when the suffix is a separate token sequence. The
  export therefore writes the prefix prompt and warns; append the suffix to each query text
  yourself (``st.encode([q + "\\nResponse:" for q in queries], prompt_name="query")``), which
  is exact. In-context examples are not exported.
- truncation: ST cuts at its ``max_seq_length`` token by token; the post-processor's tokens are
  reserved by the tokenizer, so EOS survives, but queries share the passage limit and a long
  query is cut where denselm (which re-fits the text before the suffix) may cut one token
  differently. Texts within the limits encode identically.
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

FORMATS = ("merged", "sentence-transformers")
ST_POOLING = {"last": "lasttoken", "mean": "mean", "first": "cls"}


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


def write_st_files(folder: Path, model, instruction: str | None = None) -> dict:
    """Add the sentence-transformers files to a merged model folder; returns the prompts written."""
    spec = model.spec
    template = spec.template
    prompt = instruction if instruction is not None else spec.prompt
    query_prompt, doc_prompt, suffix = st_prompts(template, prompt, spec.passage_prefix)
    if suffix:
        logger.warning(
            "template %r puts %r after each query; sentence-transformers prompts are prefixes only, so the "
            "export holds the prefix and queries must end with the suffix: "
            "st.encode([q + %r for q in queries], prompt_name='query') (see denselm/export.py)",
            template, suffix, suffix,
        )
    padding_side = "right" if spec.position_ids == "from_zero" else "left"
    write_eos_tokenizer(folder, model.tokenizer, padding_side)
    check_eos_tokenizer(folder, model.tokenizer)

    dim = int(json.loads((folder / "config.json").read_text())["hidden_size"])
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if model.normalized:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim, "pooling_mode": ST_POOLING[model.pooling],
    })
    max_len = spec.passage_max_len
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    prompts = {"query": query_prompt, "document": doc_prompt}
    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": _versions(),
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if model.normalized else "dot",
    })
    note = (f"\nQueries must end with {suffix!r}: `st.encode([q + {suffix!r} for q in queries], prompt_name=\"query\")`.\n"
            if suffix else "")
    (folder / "README.md").write_text(
        f"# denselm export\n\nA decoder embedder ({template} template, {model.pooling} pooling"
        f"{', normalised' if model.normalized else ''}) exported by `denselm export`.\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        f"st = SentenceTransformer(PATH)\nq = st.encode(queries, prompt_name=\"query\")\n"
        "d = st.encode(passages, prompt_name=\"document\")\n```\n" + note
        + f"\nThe tokenizer appends EOS itself; texts longer than {max_len} tokens are cut by sentence-transformers.\n",
        encoding="utf-8",
    )
    return {**prompts, "query_suffix": suffix}


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
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    output = Path(output)
    if output.exists() and not force:
        raise OutputExists(f"--output {output}: the folder exists; pass --overwrite to replace it, or choose another --output")
    if fmt == "sentence-transformers":  # a missing instruction fails before anything is written
        st_prompts(model.spec.template, instruction if instruction is not None else model.spec.prompt)
    with atomic_folder(output, point="export") as stage:  # --force: the old folder goes only once this is whole
        model.save(stage, merge_lora=True)
        if fmt == "sentence-transformers":
            write_st_files(stage, model, instruction)
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
    out = export(model, args.output, args.format, instruction=args.instruction, force=args.overwrite)
    logger.info("wrote %s (%s)", out, args.format)
    return 0
