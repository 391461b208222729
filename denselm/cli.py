"""The `denselm` command: each subcommand is a module with ``add_arguments(parser)`` and ``run(args)``.

    denselm train configs/tiny.yaml --train.lr 2e-4
    denselm encode --model out/ --input corpus.jsonl --output emb/
    denselm search / evaluate / mine / score / doctor / export / convert-gguf / demo / serve
    python -m denselm ...  (or python -m denselm.cli ..., the form torchrun uses)

Modules are imported only when their subcommand runs, so `denselm --help` is fast.

Errors: a ``denselm.errors.DenseLMError`` is printed as one line ``denselm CMD: error: ...`` and
its exit code returned (2 bad input or config, 3 environment); anything else is a bug and keeps
its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys

from denselm.errors import DenseLMError, UserError

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

CliError = UserError
"""Old name of the one-line usage error (exit 2); raise ``denselm.errors`` types instead."""


def _version() -> str:
    from denselm import __version__

    return __version__


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denselm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"denselm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment: a second ``main()`` in the same process (tests,
    notebooks) may have replaced it, and the first one's stream may be closed by then."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: bool) -> None:
    """denselm's own loggers at INFO (DEBUG with -v); everything else (faiss, bm25s, matplotlib,
    httpx...) at WARNING, so their loader chatter does not read like errors."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    if not any(getattr(h, "_denselm", False) for h in root.handlers):
        handler._denselm = True
        root.addHandler(handler)
    logging.getLogger("denselm").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        if command is None and "--version" in argv:
            print(f"denselm {_version()}")
            return 0
        if command is None:
            build_parser(only="__none__").print_help()
            return 0
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"denselm: error: unknown command {command}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(only=command)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args._module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown  # --section.key value pairs for the commands that take a config
    setup_logging(args.verbose)
    try:
        result = args._module.run(args)
    except DenseLMError as err:
        message = f"denselm {command}: error: {err}"
        if "tqdm" in sys.modules:  # a progress bar may still be open: write on a line of its own
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)
        return err.exit_code
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    # Run as a script (python -m denselm.cli, torchrun): call the package module's main, so the
    # error classes are the ones every other module imports (not a second copy under __main__).
    from denselm.cli import main as _main

    sys.exit(_main())
