"""The FastAPI app: routes, model loading in the background, and a uvicorn server that exits 0 on SIGTERM.

Routes:
    POST /v1/embeddings           OpenAI's; ``input_type`` "query" | "document" (default document)
    POST /query/v1/embeddings     always queries   (openai client: base_url="http://HOST/query/v1")
    POST /document/v1/embeddings  always documents
    GET  /v1/models               the served names
    GET  /health                  liveness: 200 while the process runs
    GET  /ready                   200 once every model is loaded and warmed; 503 before and while draining
    GET  /metrics                 Prometheus text
/v1 routes and /metrics need ``Authorization: Bearer KEY`` when a key is set; /health and /ready never do
(load balancers probe them).

Per request: read the body (capped), parse and validate it, tokenize (thread pool), queue the
texts (``batcher``), wait for the vectors (polling for a client that went away), render JSON or
base64 (thread pool).  The event loop itself only moves bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import hmac
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Job, Overloaded
from .metrics import ServeMetrics
from .protocol import INPUT_TYPES, ApiError, error_body, parse_request, render_embeddings
from .settings import ServeSettings

logger = logging.getLogger("denselm.serve")

DISCONNECT_POLL_S = 0.1
DRAIN_BYTES = 64 << 20
"""An over-limit body is read (and thrown away) up to this size so the client sees the 413 instead
of a reset connection; beyond it the connection is closed."""


def describe_model(encoder) -> dict:
    """The settings that make a text a vector, read in one place (logged at startup, returned by /v1/models)."""
    model = encoder.model
    return {
        "template": encoder.template,
        "instruction": encoder.prompt,
        "query_max_len": encoder.query_max_len,
        "passage_max_len": encoder.passage_max_len,
        "pooling": getattr(model, "pooling", None),
        "normalized": getattr(model, "normalized", None),
        "position_ids": getattr(model, "position_policy", None),
        "packing": getattr(model, "packing", None),
    }


POSITION_NOTES = {
    "end_aligned": ("each text's vector depends (at float-rounding level; more without rotary position "
                    "embeddings) on the longest text in its batch: positions are shifted so every row ends at the "
                    "batch's last position; from_zero (the default for new configs) cost nothing in training "
                    "on the demo recipe and is batch-independent"),
    "from_zero": "batch-independent: a text gets the same vector alone or in any batch",
}


@dataclass
class ServedModel:
    name: str
    encoder: object
    batcher: Batcher
    info: dict
    local: threading.local = field(default_factory=threading.local)

    def tokenizer_view(self, reject_long: bool):
        """This thread's copy of the encoder with its own tokenizer: a fast tokenizer's truncation
        settings are mutable state, so one shared instance is unsafe across threads.  With
        ``reject_long`` the max lengths are lifted so the real length can be checked."""
        key = "full" if reject_long else "cut"
        view = getattr(self.local, key, None)
        if view is None:
            view = copy.copy(self.encoder)
            view.tokenizer = copy.deepcopy(self.encoder.tokenizer)
            if reject_long:
                view.query_max_len = view.passage_max_len = 1 << 30
            setattr(self.local, key, view)
        return view


class ServerState:
    """What the routes share: models (once loaded), metrics, the thread pool, readiness."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServeMetrics()
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="denselm-io")
        self.on_fatal = None  # set by the server: stop it when loading fails

    # ------------------------------------------------------------ startup / shutdown
    def load(self, encoders: dict | None = None) -> None:
        """Load (unless given), start and warm every model; runs in a background thread."""
        try:
            for name, path in self.settings.models.items():
                encoder = encoders[name] if encoders is not None else self._load_encoder(path)
                if self.draining:  # the server stopped (e.g. its port was taken) while this model loaded
                    return
                s = self.settings
                batcher = Batcher(encoder, name, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens,
                                  max_wait_ms=s.max_wait_ms, max_queue_tokens=s.max_queue_tokens,
                                  torch_threads=s.torch_threads, metrics=self.metrics)
                batcher.start()
                batcher.ready.wait()
                if batcher.startup_error is not None:
                    raise batcher.startup_error
                info = describe_model(encoder)
                info["dim"] = batcher.dim
                self.models[name] = ServedModel(name, encoder, batcher, info)
                policy = info["position_ids"]
                logger.info("model %r from %s: template %s, pooling %s, normalized %s, max length query %s / "
                            "document %s, dim %s", name, path, info["template"], info["pooling"], info["normalized"],
                            info["query_max_len"], info["passage_max_len"], info["dim"])
                logger.info("model %r: position_ids=%s: %s", name, policy, POSITION_NOTES.get(policy, "unknown policy"))
            self.ready = True
            logger.info("ready: %s", ", ".join(self.models))
        except BaseException as err:
            self.load_error = err
            logger.error("loading the models failed: %s", err)
            if self.on_fatal is not None:
                self.on_fatal()

    def _load_encoder(self, path: str):
        from denselm.inference import load_encoder

        s = self.settings
        return load_encoder(path, device=s.device, preset=s.preset, dtype=s.dtype, base_model=s.base_model,
                            show_progress=False, batch_size=s.max_batch_size, max_tokens=s.max_batch_tokens)

    def close(self) -> None:
        self.ready = False
        for served in self.models.values():
            served.batcher.stop(timeout=self.settings.graceful_timeout_s)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ one request
    async def embed(self, request, route_type: str | None, labels: dict) -> bytes:
        """The response body, or ApiError; ``labels`` gets the model and input type once known (metrics)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:  # a client trickling its body in must not hold a connection forever
            body = await asyncio.wait_for(read_body(request, s.max_body_bytes), timeout=s.request_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {s.request_timeout_s:g} s") from None
        req = await loop.run_in_executor(self.pool, parse_request, body)
        input_type = labels["input_type"] = req.input_type or route_type or "document"
        if route_type is not None and req.input_type is not None and req.input_type != route_type:
            raise ApiError(400, f"input_type {req.input_type!r} contradicts the /{route_type} route", param="input_type")
        if not self.ready:
            raise ApiError(503, "the model is still loading" if not self.draining else "the server is shutting down",
                           headers={"Retry-After": str(s.retry_after_s)})
        served = self._model(req.model)
        labels["model"] = served.name
        texts = req.texts
        if len(texts) > s.max_inputs:
            raise ApiError(413, f"{len(texts)} inputs in one request; the limit is {s.max_inputs}", param="input")
        if req.dimensions is not None and req.dimensions != served.info["dim"]:
            raise ApiError(400, f"dimensions={req.dimensions} is not supported: this model was not trained for "
                                f"shorter (Matryoshka) embeddings; leave it out to get all {served.info['dim']}",
                           param="dimensions")
        ids = await loop.run_in_executor(self.pool, self._tokenize, served, texts, input_type)
        job = Job(ids=ids, loop=loop, future=loop.create_future())
        try:
            served.batcher.submit(job)
        except Overloaded as err:
            self.metrics.rejected.labels(served.name).inc()
            raise ApiError(503, f"the server is overloaded ({err}); retry later",
                           headers={"Retry-After": str(s.retry_after_s)}) from None
        vectors = await self._wait(request, served, job)
        tokens = job.tokens
        self.metrics.inputs.labels(served.name, input_type).inc(len(texts))
        self.metrics.tokens.labels(served.name, input_type).inc(tokens)
        return await loop.run_in_executor(self.pool, render_embeddings, vectors, req.encoding_format, served.name,
                                          tokens)

    def _model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(400, f"model is required: one of {', '.join(self.models)}", param="model")
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def _tokenize(self, served: ServedModel, texts: list[str], input_type: str) -> list[list[int]]:
        """Token ids as training built them (template, instruction, truncation, EOS); in a pool thread."""
        reject = self.settings.long_inputs == "reject"
        view = served.tokenizer_view(reject)
        try:
            ids = view.query_ids(texts) if input_type == "query" else view.passage_ids(texts)
        except ValueError as err:  # e.g. a template that needs an instruction the model lacks
            raise ApiError(400, str(err), param="input_type") from None
        if reject:
            limit = served.encoder.query_max_len if input_type == "query" else served.encoder.passage_max_len
            for i, row in enumerate(ids):
                if len(row) > limit:
                    raise ApiError(413, f"input[{i}] is {len(row)} tokens as a {input_type}; this model reads at "
                                        f"most {limit} (the server rejects longer inputs instead of cutting them)",
                                   param="input")
        return ids

    async def _wait(self, request, served: ServedModel, job: Job):
        """The job's (n, D) vectors; drops its queued texts if the client leaves or the timeout passes."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                served.batcher.cancel(job)
                raise ApiError(504, f"no answer within {self.settings.request_timeout_s:g} s; the request was dropped")
            done, _ = await asyncio.wait({job.future}, timeout=min(DISCONNECT_POLL_S, left))
            if done:
                try:
                    return job.future.result()
                except Exception:
                    raise ApiError(500, "the model failed on this batch; see the server log") from None
            if await request.is_disconnected():
                served.batcher.cancel(job)
                raise ApiError(499, "the client closed the connection")


async def read_body(request, limit: int) -> bytes:
    """The body, or 413 past ``limit`` bytes (read and thrown away up to DRAIN_BYTES, so the client
    gets the answer rather than a reset connection)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes")
    if declared is not None:
        try:
            if int(declared) > DRAIN_BYTES:
                raise too_big
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    if size > limit:
        raise too_big
    return b"".join(chunks)


def create_app(settings: ServeSettings, encoders: dict | None = None):
    """The FastAPI app.  ``encoders`` ({name: Encoder}, same names as ``settings.models``) skips loading."""
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Load in the background so /health answers (and /ready says 503) while the model loads.
        loader = threading.Thread(target=state.load, args=(encoders,), name="denselm-load", daemon=True)
        loader.start()
        yield
        state.draining = True
        await asyncio.to_thread(loader.join, settings.graceful_timeout_s)  # no worker may start after close
        await asyncio.to_thread(state.close)

    app = FastAPI(title="denselm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.denselm = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _bug(request, err):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    async def embeddings(request: Request, route_type: str | None):
        start = time.perf_counter()
        labels, status = {"model": "?", "input_type": route_type or "document"}, 200  # "?": not resolved yet
        try:
            check_key(request)
            body = await state.embed(request, route_type, labels)
            return Response(body, media_type="application/json")
        except ApiError as err:
            status = err.status
            return error_response(err)
        finally:
            state.metrics.requests.labels(labels["model"], labels["input_type"], str(status)).inc()
            if status == 200:
                state.metrics.latency.labels(labels["model"]).observe(time.perf_counter() - start)

    @app.post("/v1/embeddings")
    async def _embeddings(request: Request):
        return await embeddings(request, None)

    def typed_route(kind: str):
        async def route(request: Request):
            return await embeddings(request, kind)

        return route

    for kind in INPUT_TYPES:
        app.post(f"/{kind}/v1/embeddings", name=f"{kind}_embeddings")(typed_route(kind))

    @app.get("/v1/models")
    async def _models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "denselm", **m.info}
                                           for name, m in state.models.items()]}

    @app.get("/health")
    async def _health():
        return {"status": "ok"}

    @app.get("/ready")
    async def _ready():
        if state.ready and not state.draining:
            return {"status": "ready", "models": list(state.models)}
        status = "draining" if state.draining else ("failed" if state.load_error else "loading")
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics")
    async def _metrics(request: Request):
        check_key(request)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def make_server(app, settings: ServeSettings):
    """A uvicorn server for the app; SIGTERM / SIGINT drain it (stop accepting, finish in-flight requests)
    and ``run()`` then returns, so the process exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.denselm.draining = True
            if sig == signal.SIGTERM and not self.should_exit:
                self.should_exit = True  # not recorded in _captured_signals: uvicorn would re-raise it at exit
                return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=settings.graceful_timeout_s, server_header=False,
                            limit_concurrency=settings.max_connections, access_log=False)
    server = Server(config)
    app.state.denselm.on_fatal = lambda: setattr(server, "should_exit", True)
    return server


class ServerThread:
    """Run a server in a background thread (tests, notebooks): ``with ServerThread(settings) as url: ...``.

    ``settings.port=0`` picks a free port; ``url`` is ``http://host:port``.  Waits until /ready."""

    def __init__(self, settings: ServeSettings, encoders: dict | None = None, ready_timeout: float = 120.0):
        self.app = create_app(settings, encoders)
        self.server = make_server(self.app, settings)
        self.state: ServerState = self.app.state.denselm
        self.ready_timeout = ready_timeout
        self.thread = threading.Thread(target=self.server.run, name="denselm-serve", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not (self.server.started and self.state.ready):
            if self.state.load_error is not None or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start: {self.state.load_error}")
            if time.monotonic() > deadline:
                raise TimeoutError("the server was not ready in time")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
