"""The wire format: OpenAI's embeddings request / response / error shapes, parsed and written off the event loop.

    POST /v1/embeddings {"input": "text" | ["text", ...], "model": "name", "encoding_format": "float" | "base64",
                         "dimensions": null, "input_type": "query" | "document"}
    -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...] | "base64"}],
        "model": "name", "usage": {"prompt_tokens": N, "total_tokens": N}}
    errors -> {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": null}}

``input_type`` is not OpenAI's (other embedding APIs name it so); with the ``openai`` client send it
as ``extra_body={"input_type": "query"}`` or use the ``/query/v1`` base URL.  base64 is the
little-endian float32 bytes of each vector, what the ``openai`` client asks for by default.
"""

from __future__ import annotations

import base64
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

INPUT_TYPES = ("query", "document")


class ApiError(Exception):
    """An answer other than 200: HTTP status + OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class EmbeddingRequest(BaseModel):
    """OpenAI's fields (``user`` accepted and ignored) + ``input_type``.  Strict: no silent coercion of
    a number into a text."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    input_type: Literal["query", "document"] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("the input list is empty")
        for i, text in enumerate(texts):
            if not text:
                raise ValueError(f"input[{i}] is an empty string" if isinstance(value, list) else "the input is empty")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a "\ud800" JSON escape
                raise ValueError(f"input[{i}] is not valid Unicode (a lone surrogate)") from None
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_request(body: bytes) -> EmbeddingRequest:
    """Bytes -> a validated request, or ApiError(400) saying what is wrong and where."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    if "input" in obj and isinstance(obj["input"], list) and obj["input"] and not isinstance(obj["input"][0], str):
        raise ApiError(400, "input must be a string or a list of strings (token id arrays are not accepted: "
                            "the server tokenizes with the model's template)", param="input")
    try:
        return EmbeddingRequest.model_validate(obj)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(x) for x in first["loc"])
        # A str | list[str] field reports one error per union member; name the field, not the member.
        param = str(first["loc"][0]) if first["loc"] else None
        msg = first["msg"].removeprefix("Value error, ")
        if param == "input" and first["type"] in ("string_type", "list_type"):
            msg = "input must be a string or a list of strings"
        raise ApiError(400, f"{loc}: {msg}" if loc and not msg.startswith("input") else msg, param=param) from None


def render_embeddings(vectors: np.ndarray, encoding_format: str, model: str, tokens: int) -> bytes:
    """(n, D) float32 -> the response body.  float: JSON numbers that parse back to the same float32."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")  # (n, D)
    if encoding_format == "base64":
        items = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        items = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
