"""Every knob of `denselm serve` in one dataclass; the CLI flag of each field is its name with dashes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

API_KEY_ENV = "DENSELM_API_KEY"
LONG_INPUT_POLICIES = ("truncate", "reject")


@dataclass
class ServeSettings:
    models: dict[str, str]
    """Served name -> model folder (denselm output, or a plain folder with ``preset``)."""
    host: str = "127.0.0.1"
    """Bind address; only this machine can connect unless told otherwise (``--host 0.0.0.0``)."""
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    """Bearer key every /v1 and /metrics request must send; None: no authentication."""
    device: str | None = None
    dtype: str | None = None
    preset: str | None = None
    base_model: str | None = None
    max_batch_size: int = 64
    """Most texts in one forward pass."""
    max_batch_tokens: int = 16384
    """Most padded tokens (rows x longest row) in one forward pass."""
    max_wait_ms: float = 5.0
    """How long the worker waits for more requests to fill a batch once one text is queued."""
    max_queue_tokens: int = 1 << 20
    """Tokens waiting for the model beyond which requests get 503 + Retry-After (a request larger
    than this is still taken when the queue is empty)."""
    max_body_bytes: int = 8 << 20
    """Larger request bodies get 413."""
    max_inputs: int = 2048
    """Most texts in one request (OpenAI's limit); more get 413."""
    long_inputs: str = "truncate"
    """Inputs longer than the model's max length: 'truncate' (as in training) or 'reject' (413)."""
    request_timeout_s: float = 60.0
    """A request not answered by then gets 504 and its queued texts are dropped."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS; empty: no CORS headers at all."""
    torch_threads: int | None = None
    """Intra-op threads of the model's worker thread (default: torch's, one per core)."""
    tokenizer_threads: int = 2
    """Threads that tokenize requests and encode responses (off the event loop)."""
    retry_after_s: int = 1
    """Retry-After header of 503 answers."""
    graceful_timeout_s: float = 30.0
    """After SIGTERM, how long in-flight requests may take before they are cancelled."""
    max_connections: int = 1024
    """Open connections beyond which uvicorn answers 503."""

    def __post_init__(self):
        if not self.models:
            raise ConfigError("--model: at least one model folder is needed")
        checks = {
            "--port": (self.port, 0), "--max-batch-size": (self.max_batch_size, 1),
            "--max-batch-tokens": (self.max_batch_tokens, 1), "--max-queue-tokens": (self.max_queue_tokens, 1),
            "--max-body-bytes": (self.max_body_bytes, 64), "--max-inputs": (self.max_inputs, 1),
            "--tokenizer-threads": (self.tokenizer_threads, 1), "--max-connections": (self.max_connections, 1),
        }
        for flag, (value, low) in checks.items():
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if self.port > 65535:
            raise ConfigError(f"--port must be <= 65535, got {self.port}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0 or self.graceful_timeout_s < 0:
            raise ConfigError("--max-wait-ms and --graceful-timeout-s must be >= 0, --request-timeout-s > 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"--torch-threads must be >= 1, got {self.torch_threads}")
        if self.long_inputs not in LONG_INPUT_POLICIES:
            raise ConfigError(f"--long-inputs must be one of {', '.join(LONG_INPUT_POLICIES)}, got {self.long_inputs!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty")


def parse_model_args(values: list[str]) -> dict[str, str]:
    """``--model`` values, ``name=folder`` or ``folder`` (named after the folder), to {name: folder}."""
    models: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or os.path.exists(value):
            name, path = Path(value.rstrip("/")).name or value, value
        if name in models:
            raise ConfigError(f"--model: the name {name!r} is given twice; use --model NAME=FOLDER")
        if not Path(path).is_dir():
            raise ConfigError(f"--model {value}: no such folder")
        models[name] = path
    return models


def load_api_key(key_file: str | None) -> str | None:
    """The API key from ``--api-key-file`` (first line) or the DENSELM_API_KEY variable; never a flag,
    which anyone on the machine could read in ``ps``."""
    env = os.environ.get(API_KEY_ENV)
    if key_file is not None:
        if env:
            raise ConfigError(f"--api-key-file and ${API_KEY_ENV} are both set; use one")
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ConfigError(f"--api-key-file {key_file}: {err.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file {key_file}: the file is empty")
        return key
    if env is not None:
        if not env.strip():
            raise ConfigError(f"${API_KEY_ENV} is set but empty")
        return env.strip()
    return None
