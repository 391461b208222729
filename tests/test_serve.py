"""`denselm serve`: the real `openai` client against a running server on a tiny model.

Same vectors as `denselm encode`; auth; every bad input answered with its 4xx while the server
keeps serving; 64 concurrent clients matched to their inputs; backpressure, timeouts, readiness;
SIGTERM drains a subprocess server, which exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from data_helpers import WORDS, write_jsonl  # noqa: E402
from test_api import save_tiny  # noqa: E402

import denselm  # noqa: E402
from denselm.cli import main as cli_main  # noqa: E402
from denselm.errors import ConfigError  # noqa: E402
from denselm.embeddings import load_embeddings  # noqa: E402
from denselm.serve.app import ServerThread, create_app, make_server  # noqa: E402
from denselm.serve.settings import ServeSettings, load_api_key, parse_model_args  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def texts_for(seed: int, n: int) -> list[str]:
    """n distinct texts of mixed lengths (1..40 words: some over the 48-token passage limit)."""
    return [" ".join(WORDS[(seed * 13 + i * 7 + j) % len(WORDS)] for j in range(1 + (seed * 5 + i * 11) % 40))
            + f" #{seed}-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def enc(model_dir):
    return denselm.load(model_dir, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def url(model_dir, enc):
    settings = ServeSettings(models={"tiny": str(model_dir)}, port=0, api_key=KEY, max_wait_ms=2)
    with ServerThread(settings, encoders={"tiny": enc}) as base:
        yield base


def client(url: str, prefix: str = "") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}{prefix}/v1", api_key=KEY, max_retries=0)


def vectors(resp) -> np.ndarray:
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)


def post(url: str, body: bytes | None = None, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", content=body, headers={**AUTH, **(headers or {})}, timeout=30, **kw)


def assert_serving(url: str, enc) -> None:
    resp = post(url, json.dumps({"input": ["apple", "still serving"]}).encode())
    assert resp.status_code == 200, resp.text
    got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, enc.encode_corpus(["apple", "still serving"]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ equality


def test_openai_client_equals_denselm_encode(tmp_path, url, model_dir, enc):
    docs = [{"_id": f"d{i}", "text": t} for i, t in enumerate(texts_for(1, 9))]
    write_jsonl(tmp_path / "c.jsonl", docs)
    write_jsonl(tmp_path / "q.jsonl", docs)
    for kind, name in (("corpus", "c"), ("queries", "q")):
        assert cli_main(["encode", "--dtype", "float32", "--model", str(model_dir), "--input", str(tmp_path / f"{name}.jsonl"),
                         "--output", str(tmp_path / kind), "--kind", kind, "--device", "cpu"]) == 0
    _, cli_docs = load_embeddings(tmp_path / "corpus")
    _, cli_queries = load_embeddings(tmp_path / "queries")
    texts = [d["text"] for d in docs]

    resp = client(url).embeddings.create(input=texts, model="tiny")  # the client asks for base64
    np.testing.assert_allclose(vectors(resp), cli_docs, rtol=0, atol=1e-6)
    assert resp.model == "tiny"
    tokens = sum(len(x) for x in enc.passage_ids(texts))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == tokens
    floats = client(url).embeddings.create(input=texts, model="tiny", encoding_format="float")
    np.testing.assert_allclose(vectors(floats), cli_docs, rtol=0, atol=1e-6)

    # Queries: the /query route, or input_type in the body; the model may be left out (one model served).
    q1 = client(url, "/query").embeddings.create(input=texts, model="tiny")
    q2 = client(url).embeddings.create(input=texts, model="tiny", extra_body={"input_type": "query"})
    np.testing.assert_allclose(vectors(q1), cli_queries, rtol=0, atol=1e-6)
    np.testing.assert_allclose(vectors(q2), cli_queries, rtol=0, atol=1e-6)
    one = post(url, json.dumps({"input": texts[0], "input_type": "document"}).encode()).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], cli_docs[0], rtol=0, atol=1e-6)
    assert post(url, json.dumps({"input": "a", "input_type": "document"}).encode(),
                ).status_code == 200
    contradiction = httpx.post(f"{url}/query/v1/embeddings", json={"input": "a", "input_type": "document"},
                               headers=AUTH)
    assert contradiction.status_code == 400 and "contradicts" in contradiction.json()["error"]["message"]


# ------------------------------------------------------------------------------ auth, bad input


def test_auth(url, enc):
    for key in ("wrong-key", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).embeddings.create(input="a", model="tiny")
    resp = httpx.post(f"{url}/v1/embeddings", json={"input": "a"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/v1/embeddings", json={"input": "a"}, headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{url}/ready").status_code == 200
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in models] == ["tiny"] and models[0]["position_ids"] == "end_aligned"
    assert_serving(url, enc)


BAD = [
    ("not JSON", b"{input: apple}", 400, "not valid JSON"),
    ("JSON array", b'["apple"]', 400, "JSON object"),
    ("input a number", b'{"input": 3}', 400, "string or a list of strings"),
    ("token ids", b'{"input": [101, 102]}', 400, "token id"),
    ("mixed list", b'{"input": ["apple", 3]}', 400, "string or a list of strings"),
    ("nested list", b'{"input": [["apple"]]}', 400, "string or a list of strings"),
    ("no input", b'{"model": "tiny"}', 400, "input"),
    ("model a number", b'{"input": "a", "model": 5}', 400, "model"),
    ("bad encoding_format", b'{"input": "a", "encoding_format": "int8"}', 400, "encoding_format"),
    ("bad input_type", b'{"input": "a", "input_type": "passage"}', 400, "input_type"),
    ("empty list", b'{"input": []}', 400, "empty"),
    ("empty string", b'{"input": ""}', 400, "empty"),
    ("empty string in list", b'{"input": ["a", ""]}', 400, "input[1] is an empty string"),
    ("invalid UTF-8", b'{"input": "caf\xe9"}', 400, "UTF-8"),
    ("lone surrogate", b'{"input": "\\ud800"}', 400, "surrogate"),
    ("unknown model", b'{"input": "a", "model": "gpt-4"}', 404, "does not exist"),
    ("dimensions", b'{"input": "a", "dimensions": 32}', 400, "Matryoshka"),
    ("10k inputs", json.dumps({"input": ["apple"] * 10_000}).encode(), 413, "limit is 2048"),
    ("10 MB body", json.dumps({"input": "a" * (10 << 20)}).encode(), 413, "larger than"),
]


@pytest.mark.parametrize("body,status,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_and_the_server_keeps_serving(url, enc, body, status, message):
    resp = post(url, body, {"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert_serving(url, enc)


def test_other_http_errors_are_json(url):
    resp = httpx.get(f"{url}/v1/embeddings", headers=AUTH)
    assert resp.status_code == 405 and "error" in resp.json()
    assert httpx.get(f"{url}/nowhere").json()["error"]["message"] == "Not Found"
    ok = post(url, json.dumps({"input": "a", "dimensions": 64}).encode())  # the full size is allowed
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 64


# ------------------------------------------------------------------------------ concurrency


def test_64_concurrent_clients_get_their_own_vectors(url, enc):
    inputs = [texts_for(100 + c, 1 + c % 5) for c in range(64)]
    kinds = ["query" if c % 3 == 0 else "document" for c in range(64)]
    flat_q = [t for c, ts in enumerate(inputs) for t in ts if kinds[c] == "query"]
    flat_d = [t for c, ts in enumerate(inputs) for t in ts if kinds[c] == "document"]
    expected = dict(zip(flat_q, enc.encode_queries(flat_q))) | {("d", t): v for t, v in zip(flat_d, enc.encode_corpus(flat_d))}

    async def one(aclient, c):
        resp = await aclient.embeddings.create(input=inputs[c], model="tiny", extra_body={"input_type": kinds[c]})
        return c, vectors(resp)

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, c) for c in range(64)))

    before = metric(url, "denselm_batch_size_count")
    for c, got in asyncio.run(main()):
        want = np.stack([expected[t] if kinds[c] == "query" else expected[("d", t)] for t in inputs[c]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    batches = metric(url, "denselm_batch_size_count") - before
    assert batches < sum(len(x) for x in inputs)  # requests shared forward passes
    assert metric(url, 'denselm_requests_total{input_type="query",model="tiny",status="200"}') >= 22


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "{" not in name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_split_across_batches_backpressure_timeout_and_reject(model_dir, enc):
    """Small limits: a request is split over batches of 4; a full queue answers 503 + Retry-After;
    a request that outlives its timeout gets 504 and its texts are dropped, one whose body does not
    arrive in time 408; --long-inputs reject."""
    settings = ServeSettings(models={"tiny": str(model_dir)}, port=0, max_batch_size=4, max_wait_ms=800,
                             max_queue_tokens=40, request_timeout_s=0.3, long_inputs="reject")
    with ServerThread(settings, encoders={"tiny": enc}) as base:
        texts = texts_for(7, 10)[:10]
        short = [t[:12] for t in texts]  # under the 48-token limit (rejected otherwise)
        first: dict = {}
        waiter = threading.Thread(target=lambda: first.update(r=httpx.post(
            f"{base}/v1/embeddings", json={"input": short}, timeout=30)))
        waiter.start()
        time.sleep(0.1)  # the first request waits in the queue (max_wait 800 ms, batch not full)
        busy = httpx.post(f"{base}/v1/embeddings", json={"input": short}, timeout=30)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        waiter.join()
        # the first request waited past its 0.3 s timeout: 504, its queued texts dropped
        assert first["r"].status_code == 504, first["r"].text
        assert metric(base, "denselm_dropped_inputs_total") > 0
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:  # a body that never completes
            raw.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"input\"")
            assert raw.recv(100).startswith(b"HTTP/1.1 408")
        long = httpx.post(f"{base}/v1/embeddings", json={"input": ["apple", " ".join(WORDS * 3)]}, timeout=30)
        assert long.status_code == 413 and "input[1]" in long.json()["error"]["message"]
        assert httpx.get(f"{base}/ready").status_code == 200
    # A long timeout: split over 3 batches of <= 4 rows, reassembled in order; a client that
    # hangs up while its texts wait in the queue has them dropped (status 499 in the metrics).
    settings = ServeSettings(models={"tiny": str(model_dir)}, port=0, max_batch_size=4, max_wait_ms=0)
    with ServerThread(settings, encoders={"tiny": enc}) as base:
        resp = client(base).embeddings.create(input=texts, model="tiny")
        np.testing.assert_allclose(vectors(resp), enc.encode_corpus(texts), rtol=0, atol=1e-6)
        assert metric(base, "denselm_batch_size_count") >= 3
    settings = ServeSettings(models={"tiny": str(model_dir)}, port=0, max_wait_ms=3000)
    with ServerThread(settings, encoders={"tiny": enc}) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"input": ["apple", "pear"]}).encode()
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)  # queued: the worker waits up to 3 s for a fuller batch
        deadline = time.monotonic() + 10
        while metric(base, 'denselm_requests_total{input_type="document",model="tiny",status="499"}') < 1:
            assert time.monotonic() < deadline, "the disconnected client's request was not dropped"
            time.sleep(0.05)
        assert metric(base, "denselm_dropped_inputs_total") == 2
        assert metric(base, "denselm_batch_size_count") == 0  # nothing of it reached the model


def test_two_models_by_name(tmp_path, model_dir, enc):
    other_dir = save_tiny(tmp_path / "other", position_ids="from_zero", prompt="Find the fruit")
    other = denselm.load(other_dir, device="cpu", show_progress=False)
    settings = ServeSettings(models={"a": str(model_dir), "b": str(other_dir)}, port=0)
    with ServerThread(settings, encoders={"a": enc, "b": other}) as base:
        texts = texts_for(5, 4)
        for name, e in (("a", enc), ("b", other)):
            got = client(base, "/query").embeddings.create(input=texts, model=name)
            np.testing.assert_allclose(vectors(got), e.encode_queries(texts), rtol=0, atol=1e-6)
        no_model = httpx.post(f"{base}/v1/embeddings", json={"input": "a"})
        assert no_model.status_code == 400 and "model is required" in no_model.json()["error"]["message"]
        info = {m["id"]: m for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert (info["a"]["position_ids"], info["b"]["position_ids"]) == ("end_aligned", "from_zero")
        assert info["b"]["instruction"] == "Find the fruit"


class _SlowEncoders(dict):
    """Encoders whose loading blocks until ``release`` is set (to observe /ready before the model is up)."""

    def __init__(self, enc):
        super().__init__(tiny=enc)
        self.release = threading.Event()

    def __getitem__(self, name):
        self.release.wait(30)
        return super().__getitem__(name)


def test_ready_only_after_loading(model_dir, enc):
    slow = _SlowEncoders(enc)
    settings = ServeSettings(models={"tiny": str(model_dir)}, port=0)
    app = create_app(settings, encoders=slow)
    server = make_server(app, settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        base = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
        assert httpx.get(f"{base}/health").status_code == 200
        not_ready = httpx.get(f"{base}/ready")
        assert not_ready.status_code == 503 and not_ready.json()["status"] == "loading"
        early = httpx.post(f"{base}/v1/embeddings", json={"input": "a"})
        assert early.status_code == 503 and "loading" in early.json()["error"]["message"]
        slow.release.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(f"{base}/v1/embeddings", json={"input": "a"}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


# ------------------------------------------------------------------------------ CLI, SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_is_an_environment_problem(model_dir):
    from denselm.errors import EnvironmentProblem
    from denselm.serve.command import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServeSettings(models={"tiny": str(model_dir)}, port=taken.getsockname()[1])
        with pytest.raises(EnvironmentProblem, match="could not listen"):
            serve(settings)


def test_cli_settings(tmp_path, model_dir, monkeypatch):
    monkeypatch.delenv("DENSELM_API_KEY", raising=False)
    assert cli_main(["serve", "--model", str(model_dir), "--api-key", "secret"]) == 2  # never a flag
    assert parse_model_args([str(model_dir), f"b={model_dir}"]) == {"tiny": str(model_dir), "b": str(model_dir)}
    with pytest.raises(ConfigError, match="twice"):
        parse_model_args([str(model_dir), f"tiny={model_dir}"])
    with pytest.raises(ConfigError, match="no such folder"):
        parse_model_args(["x=/nonexistent"])
    assert load_api_key(None) is None
    monkeypatch.setenv("DENSELM_API_KEY", " k ")
    assert load_api_key(None) == "k"
    (tmp_path / "key").write_text("from-file\n")
    with pytest.raises(ConfigError, match="both"):
        load_api_key(str(tmp_path / "key"))
    monkeypatch.delenv("DENSELM_API_KEY")
    assert load_api_key(str(tmp_path / "key")) == "from-file"
    with pytest.raises(ConfigError, match="--max-batch-size"):
        ServeSettings(models={"t": str(model_dir)}, max_batch_size=0)
    assert "secret" not in repr(ServeSettings(models={"t": str(model_dir)}, api_key="secret"))


@pytest.fixture(scope="module", autouse=True)
def subprocess_server(model_dir, tmp_path_factory):
    """`denselm serve` in a subprocess, started before the module's first test so that its slow
    start (importing torch) overlaps the other tests; the SIGTERM test, last, uses it."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(denselm.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("DENSELM_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "denselm.cli", "serve", "--model", f"tiny={model_dir}", "--port", str(port),
         "--api-key-file", str(key_file), "--device", "cpu", "--max-wait-ms", "1500", "--torch-threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_in_flight_requests_and_exits_0(subprocess_server, enc):
    proc, base = subprocess_server
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)
    texts = texts_for(3, 3)
    result: dict = {}
    inflight = threading.Thread(target=lambda: result.update(r=client(base).embeddings.create(
        input=texts, model="tiny")))
    inflight.start()
    time.sleep(0.4)  # queued: the worker waits up to 1.5 s for more texts
    proc.send_signal(signal.SIGTERM)
    inflight.join(30)
    np.testing.assert_allclose(vectors(result["r"]), enc.encode_corpus(texts), rtol=0, atol=1e-6)
    assert proc.wait(30) == 0
    out = proc.stdout.read()
    assert "position_ids=end_aligned" in out and KEY not in out
    with pytest.raises(httpx.TransportError):  # nothing listens any more
        httpx.get(f"{base}/health", timeout=1)


def test_serve_reruns_itself_with_passive_openmp_threads(monkeypatch):
    """`denselm serve` re-executes once with OMP_WAIT_POLICY=PASSIVE (spinning intra-op threads made
    each request ~10x slower on busy cores); a value the user set, or a process that is not the CLI, is left alone."""
    from denselm.serve.command import passive_omp_argv

    cli = ["/venv/bin/python", "-m", "denselm.cli", "serve", "--model", "m"]
    monkeypatch.setattr(sys, "argv", ["/x/denselm/cli.py", "serve", "--model", "m"])
    monkeypatch.setattr(sys, "orig_argv", cli)
    assert passive_omp_argv({}) == [sys.executable, "-m", "denselm.cli", "serve", "--model", "m"]
    assert passive_omp_argv({"OMP_WAIT_POLICY": "ACTIVE"}) is None
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pytest", "tests"])
    assert passive_omp_argv({}) is None
