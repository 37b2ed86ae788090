"""The server's Prometheus metrics, each named once: text-embeddings-inference's names, plus the
packing's own.

TEI's (router/src/lib.rs, core/src/queue.rs): `te_request_count{method}`, `te_request_success{method}`,
`te_request_failure{err}`, the per-call histograms `te_request_duration`,
`te_request_tokenization_duration`, `te_request_queue_duration`, `te_request_inference_duration`
(seconds; a call of n inputs observes its inputs' mean, as TEI's headers do), the per-batch
histograms `te_batch_next_size` (requests) and `te_batch_next_tokens`, and the gauge
`te_queue_size` (requests waiting for a batch). prometheus-client writes a counter `te_x` as
`te_x_total` (the OpenMetrics rule; TEI's Rust exporter leaves the suffix off).

Packing's: `poprt_batch_token_slots` (tokens the model ran per batch, padding included),
`poprt_padding_tokens` (counter) and `poprt_packing_efficiency` (real tokens / slots so far).

Every server has its own registry, so several apps in one process (tests, Ray replicas) never share
or collide.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from poprt_lite.runtime.pack_runner import BatchRun

SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
REQUESTS = tuple(2.0**k for k in range(11))  # 1 .. 1024
TOKENS = tuple(2.0**k for k in range(3, 18))  # 8 .. 131072


class Metrics:
    """The metrics of one server; `observe_batch` is a runner's batch listener."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pending=lambda: 0) -> None:
        disable_created_metrics()  # no `_created` series beside each counter (TEI has none); process-wide
        self.registry = registry = CollectorRegistry()
        self.request_count = Counter("te_request_count", "HTTP calls received", ["method"], registry=registry)
        self.request_success = Counter("te_request_success", "HTTP calls answered 200", ["method"], registry=registry)
        self.request_failure = Counter("te_request_failure", "HTTP calls refused or failed, by error type", ["err"], registry=registry)
        self.request_duration = Histogram("te_request_duration", "Call time, seconds", buckets=SECONDS, registry=registry)
        self.tokenization_duration = Histogram(
            "te_request_tokenization_duration", "Tokenization time per input, seconds", buckets=SECONDS, registry=registry
        )
        self.queue_duration = Histogram("te_request_queue_duration", "Wait for a batch per input, seconds", buckets=SECONDS, registry=registry)
        self.inference_duration = Histogram(
            "te_request_inference_duration", "Model run of the input's batch, seconds", buckets=SECONDS, registry=registry
        )
        self.batch_size = Histogram("te_batch_next_size", "Requests per batch", buckets=REQUESTS, registry=registry)
        self.batch_tokens = Histogram("te_batch_next_tokens", "Real tokens per batch", buckets=TOKENS, registry=registry)
        self.batch_slots = Histogram("poprt_batch_token_slots", "Token slots the model ran per batch (padding included)", buckets=TOKENS, registry=registry)
        self.padding = Counter("poprt_padding_tokens", "Padding token slots run", registry=registry)
        Gauge("te_queue_size", "Requests waiting for a batch", registry=registry).set_function(pending)
        Gauge("poprt_packing_efficiency", "Real tokens / token slots over the batches run", registry=registry).set_function(self._efficiency)
        self._lock = threading.Lock()
        self._tokens = self._slots = 0

    def observe_batch(self, batch: BatchRun) -> None:
        self.batch_size.observe(batch.requests)
        self.batch_tokens.observe(batch.tokens)
        self.batch_slots.observe(batch.token_slots)
        self.padding.inc(batch.token_slots - batch.tokens)
        with self._lock:
            self._tokens += batch.tokens
            self._slots += batch.token_slots

    def _efficiency(self) -> float:
        with self._lock:
            return self._tokens / self._slots if self._slots else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
