"""Dynamic batching: every request's texts go into one queue; one worker thread runs the model on
token-budget batches drawn from it, across requests.

    request A: 3 texts ─┐                       ┌─ batch 1: A0 A1 A2 B0   (<= max_batch_size rows,
    request B: 5 texts ─┼─> queue (in tokens) ──┤                          <= max_batch_tokens padded)
    request C: 1 text  ─┘                       └─ batch 2: B1 B2 B3 B4 C0

A request may be split across batches; its vectors are written into its own result rows by
index, so it is reassembled in input order and no other request's rows can reach it.  Each
request's texts are queued longest first, so consecutive rows have similar lengths (little padding).

The worker is the only thread that touches the model (and sets torch's thread count).  The queue
is bounded in tokens: ``submit`` raises ``Overloaded`` beyond ``max_queue_tokens``.  ``cancel``
drops a request's queued texts (its client disconnected or timed out).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue holds more tokens than allowed: answer 503 with Retry-After."""


@dataclass
class Job:
    """One request's texts as token ids, and where their vectors go."""

    ids: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    """Set by the event loop (client gone) or the worker (a batch failed): queued texts are skipped."""

    def __post_init__(self):
        self.results = [None] * len(self.ids)
        self.remaining = len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


@dataclass
class _Item:
    job: Job
    index: int
    queued_at: float

    @property
    def length(self) -> int:
        return len(self.job.ids[self.index])


class Batcher:
    """The queue and worker thread of one model (an ``denselm.inference.Encoder``)."""

    def __init__(self, encoder, name: str, *, max_batch_size: int, max_batch_tokens: int, max_wait_ms: float,
                 max_queue_tokens: int, torch_threads: int | None = None, metrics=None):
        self.encoder, self.name = encoder, name
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self.torch_threads = torch_threads
        self.metrics = metrics
        self.dim: int | None = None
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"denselm-model-{name}", daemon=True)

    # ------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job's texts (longest first); Overloaded if the queue is full (an empty queue takes any job)."""
        tokens = job.tokens
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if self._queue and self._queued_tokens + tokens > self.max_queue_tokens:
                raise Overloaded(f"{self._queued_tokens} tokens are queued (limit {self.max_queue_tokens})")
            now = time.monotonic()
            order = sorted(range(len(job.ids)), key=lambda i: -len(job.ids[i]))
            self._queue.extend(_Item(job, i, now) for i in order)
            self._queued_tokens += tokens
            self._gauge()
            self._cond.notify()

    def cancel(self, job: Job) -> int:
        """Drop the job's queued texts; returns how many were dropped (texts in a running batch finish)."""
        job.cancelled = True
        with self._cond:
            kept = collections.deque(item for item in self._queue if item.job is not job)
            dropped = len(self._queue) - len(kept)
            self._queued_tokens -= sum(item.length for item in self._queue if item.job is job)
            self._queue = kept
            self._gauge()
        if dropped and self.metrics is not None:
            self.metrics.dropped.labels(self.name).inc(dropped)
        return dropped

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued texts, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    # ------------------------------------------------------------ worker side
    def _run(self) -> None:
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        try:
            self.encoder.model.eval()
            warm = self.encoder.passage_ids(["warm up"]) + self.encoder.passage_ids(["a longer text to warm up " * 4])
            self.dim = int(self.encoder.encode_batch(warm).shape[1])
        except BaseException as err:  # reported by the app, which stops the server
            self.startup_error = err
            self.ready.set()
            return
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._encode(batch)

    def _next_batch(self) -> list[_Item] | None:
        """Wait for texts, give late requests up to max_wait to join, then take one batch (FIFO)."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].queued_at + self.max_wait
            while not self._stopping and not self._full() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch: list[_Item] = []
            longest = 0
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue[0]
                if item.job.cancelled:  # dropped by the worker after a failed batch
                    self._queue.popleft()
                    self._queued_tokens -= item.length
                    continue
                longest_next = max(longest, item.length)
                if batch and (len(batch) + 1) * longest_next > self.max_batch_tokens:
                    break
                self._queue.popleft()
                self._queued_tokens -= item.length
                batch.append(item)
                longest = longest_next
            self._gauge()
            return batch

    def _full(self) -> bool:
        return len(self._queue) >= self.max_batch_size or self._queued_tokens >= self.max_batch_tokens

    def _encode(self, batch: list[_Item]) -> None:
        if not batch:
            return
        rows = [item.job.ids[item.index] for item in batch]
        start = time.perf_counter()
        try:
            reps = self.encoder.encode_batch(rows).numpy()  # (B, D) float32
        except Exception as err:  # a bad batch fails its requests, never the worker
            logger.exception("model %s: a batch of %d texts failed", self.name, len(batch))
            for job in {id(item.job): item.job for item in batch}.values():
                job.cancelled = True
                job.loop.call_soon_threadsafe(_set_exception, job.future, err)
            return
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.name).observe(len(batch))
            self.metrics.batch_tokens.labels(self.name).observe(len(batch) * max(len(r) for r in rows))
            self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - start)
        for item, vec in zip(batch, reps):
            job = item.job
            job.results[item.index] = vec
            job.remaining -= 1
            if job.remaining == 0 and not job.cancelled:
                job.loop.call_soon_threadsafe(_set_result, job.future, np.stack(job.results))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_tokens.labels(self.name).set(self._queued_tokens)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
