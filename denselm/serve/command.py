"""`denselm serve`: parse flags into ServeSettings and run the server until SIGTERM (then exit 0).

    DENSELM_API_KEY=secret denselm serve --model out/model
    denselm serve --model small=out/a --model big=out/b --api-key-file key.txt --host 0.0.0.0 --port 8000

One process holds one copy of each model and one worker thread per model.  More copies mean more
processes (one per core group or GPU) behind a load balancer: each costs a full copy of the
weights in memory and its own batch queue, and batches do not form across processes.

The command re-runs itself once with ``OMP_WAIT_POLICY=PASSIVE`` unless that variable is set
(see ``passive_omp_argv``): on dedicated cores ``OMP_WAIT_POLICY=ACTIVE denselm serve ...`` is faster.
"""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError, EnvironmentProblem, require


def add_arguments(parser) -> None:
    import argparse

    from denselm.inference import PRESETS

    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]FOLDER",
                        help="model to serve (repeat for several; the name defaults to the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api-key-file", default=None,
                        help="file whose first line is the API key (or set DENSELM_API_KEY); default: no key")
    # An explicit flag so that argparse never reads '--api-key' as an abbreviation of --api-key-file.
    parser.add_argument("--api-key", dest="_api_key_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="template preset for a plain transformers folder without denselm.json")
    parser.add_argument("--base-model", default=None, help="base model folder of a LoRA adapter (default: the manifest's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most texts per forward pass (default 64)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="most padded tokens per forward pass (default 16384)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a queued text waits for others to fill its batch (default 5)")
    parser.add_argument("--max-queue-tokens", type=int, default=1 << 20,
                        help="queued tokens beyond which requests get 503 + Retry-After (default 1048576)")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20, help="request body limit, 413 beyond (default 8 MiB)")
    parser.add_argument("--max-inputs", type=int, default=2048, help="most texts per request, 413 beyond (default 2048)")
    parser.add_argument("--long-inputs", default="truncate", choices=["truncate", "reject"],
                        help="inputs over the model's max length: cut as in training (default) or answer 413")
    parser.add_argument("--request-timeout-s", type=float, default=60.0,
                        help="504 and the request's queued texts dropped after this long (default 60)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow this browser origin (repeatable); default: no CORS")
    parser.add_argument("--torch-threads", type=int, default=None, help="threads of the model's worker (default: torch's)")
    parser.add_argument("--tokenizer-threads", type=int, default=2,
                        help="threads that tokenize and write responses (default 2)")
    parser.add_argument("--graceful-timeout-s", type=float, default=30.0,
                        help="after SIGTERM, how long in-flight requests may run (default 30)")


def settings_from_args(args):
    from .settings import ServeSettings, load_api_key, parse_model_args

    if args._api_key_flag is not None:
        raise ConfigError("--api-key is not accepted: a key on the command line is visible to every user in `ps`; "
                          "set DENSELM_API_KEY or use --api-key-file")
    return ServeSettings(
        models=parse_model_args(args.model), host=args.host, port=args.port, api_key=load_api_key(args.api_key_file),
        device=args.device, dtype=args.dtype, preset=args.preset, base_model=args.base_model,
        max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
        max_queue_tokens=args.max_queue_tokens, max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
        long_inputs=args.long_inputs, request_timeout_s=args.request_timeout_s, cors_origins=tuple(args.cors_origin),
        torch_threads=args.torch_threads, tokenizer_threads=args.tokenizer_threads,
        graceful_timeout_s=args.graceful_timeout_s,
    )


def serve(settings) -> int:
    """Run until SIGTERM / SIGINT; 0 after a clean drain."""
    import logging

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client")):
        require(module, "serve", "denselm serve", package)
    from .app import create_app, make_server

    logger = logging.getLogger("denselm.serve")
    app = create_app(settings)
    server = make_server(app, settings)
    logger.info("serving %s on http://%s:%d (API key: %s)", ", ".join(settings.models), settings.host, settings.port,
                "required" if settings.api_key else "none")
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind; say why in our terms
        raise EnvironmentProblem(f"could not listen on {settings.host}:{settings.port} "
                                 "(the port is in use, or binding there is not allowed)") from None
    state = app.state.denselm
    if state.load_error is not None:
        err = state.load_error
        raise EnvironmentProblem(f"could not load the model: {err}") from err
    if not server.started:
        raise EnvironmentProblem(f"could not listen on {settings.host}:{settings.port} (in use, or not allowed)")
    return 0


OMP_WAIT_ENV = "OMP_WAIT_POLICY"


def passive_omp_argv(environ=None) -> list[str] | None:
    """The command line to re-run this process with ``OMP_WAIT_POLICY=PASSIVE``; None when it is already set.

    Why: OpenMP's default (active) policy keeps the model worker's idle intra-op threads spinning
    between parallel regions.  The server's worker runs Python between torch ops (and the event loop
    and tokenizer threads share the cores), so on a CPU with no spare core the spinning threads take
    the core the worker needs: measured on 2 busy cores (SmolLM2 16 layers, one 275-token text per
    request, 2 threads) 3.45 s per request, 0.34 s with the passive policy, same as a plain
    sentence-transformers server (0.33 s).  The price on cores the server has to itself: at load 2 the
    same request took 0.18-0.23 s spinning and 0.33-0.43 s passive, so a server on dedicated cores
    can run with ``OMP_WAIT_POLICY=ACTIVE`` (kept as set, see below).  libgomp reads the variable once, when torch loads it,
    which has happened by the time a subcommand runs: setting it now needs a fresh process.  A value
    the user set (any) is kept; a process that is not the ``denselm serve`` command itself (a test or
    notebook calling the CLI's main) is never replaced."""
    from pathlib import Path

    environ = os.environ if environ is None else environ
    if environ.get(OMP_WAIT_ENV):
        return None
    if Path(sys.argv[0]).name not in ("denselm", "cli.py", "__main__.py") or "serve" not in sys.argv[1:]:
        return None
    return [sys.executable, *sys.orig_argv[1:]]


def run(args) -> int:
    settings = settings_from_args(args)  # bad flags fail here, before any re-run
    argv = passive_omp_argv()
    if argv is not None:
        os.environ[OMP_WAIT_ENV] = "PASSIVE"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)  # does not return
    return serve(settings)
