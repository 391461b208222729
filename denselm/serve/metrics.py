"""Prometheus metrics of one server (its own registry, so two servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("denselm_requests", "Embedding requests answered, by model, input type and status",
                                ["model", "input_type", "status"], registry=r)
        self.inputs = Counter("denselm_inputs", "Texts embedded", ["model", "input_type"], registry=r)
        self.tokens = Counter("denselm_tokens", "Tokens embedded (after truncation)", ["model", "input_type"],
                              registry=r)
        self.latency = Histogram("denselm_request_latency_seconds", "Time from request to response, by model",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("denselm_batch_size", "Texts per forward pass", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("denselm_batch_padded_tokens", "Padded tokens per forward pass", ["model"],
                                      buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("denselm_batch_seconds", "Forward-pass time", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_tokens = Gauge("denselm_queue_tokens", "Tokens waiting for the model", ["model"], registry=r)
        self.dropped = Counter("denselm_dropped_inputs", "Queued texts dropped (client gone or timed out)",
                               ["model"], registry=r)
        self.rejected = Counter("denselm_overloaded", "Requests refused with 503 (queue full)", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
