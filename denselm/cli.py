"""The `denselm` command: each subcommand is a module with ``add_arguments(parser)`` and ``run(args)``.

    denselm train configs/tiny.yaml --train.lr 2e-4
    denselm encode --model out/ --input corpus.jsonl --output emb/
    denselm search / evaluate / mine / score / doctor / export / convert-gguf / demo / serve

Modules are imported only when their subcommand runs, so `denselm --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("denselm.train", "fine-tune a decoder LLM as a retriever from JSONL data"),
    "encode": ("denselm.encode", "encode a JSONL corpus or queries into embedding shards"),
    "search": ("denselm.search", "search embeddings (exact or FAISS) and write a TREC run"),
    "evaluate": ("denselm.evaluate", "evaluate a model on BEIR-format data (nDCG, MRR, Recall, MAP)"),
    "mine": ("denselm.mine", "mine hard negatives with a model or BM25"),
    "score": ("denselm.score", "add teacher scores (pos_scores/neg_scores) to training JSONL"),
    "doctor": ("denselm.doctor", "check training data before training: duplicates, leakage, false negatives, truncation"),
    "export": ("denselm.export", "export merged weights or a sentence-transformers folder"),
    "convert-gguf": ("denselm.convert", "convert a GGUF checkpoint into a transformers folder"),
    "demo": ("denselm.demo", "the end-to-end demo: SmolLM2 on Python FAQ retrieval"),
    "info": ("denselm.spec", "print a model folder's embedding spec (template, pooling, lengths...) as JSON"),
    "serve": ("denselm.serve.command", "serve a model over HTTP: OpenAI-compatible /v1/embeddings"),
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denselm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        build_parser(only="__none__").print_help()
        return 0 if command is None else 2
    parser = build_parser(only=command)
    args, unknown = parser.parse_known_args(argv)
    args._unknown = unknown
    if unknown and not getattr(args._module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        result = args._module.run(args)
    except (CliError, FileNotFoundError, ValueError) as err:
        print(f"denselm {command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
