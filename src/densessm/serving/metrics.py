"""Prometheus metrics of the server (``GET /metrics``): load, latency, batching and prompt-cache use.

Each server owns a registry of its own (not the process-wide default), so two servers in one process, or a
test that builds several, never share counters. Names follow Prometheus conventions (``_total`` counters,
``_seconds`` histograms) under the ``densessm_`` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The server's counters, gauges and histograms; thread-safe (the engine's thread updates them)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "densessm_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("densessm_prompt_tokens", "prompt tokens received", registry=r)
        self.generation_tokens = Counter("densessm_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("densessm_requests_cancelled", "requests whose client went away early", registry=r)
        self.rejected = Counter("densessm_requests_rejected", "requests refused because the queue was full", registry=r)
        self.failed = Counter("densessm_requests_failed", "requests that failed inside the engine", registry=r)
        self.running = Gauge("densessm_batch_rows", "completions in the running decode batch", registry=r)
        self.capacity = Gauge("densessm_batch_capacity", "rows the decode batch can hold (--max-batch)", registry=r)
        self.capacity.set(max_batch)
        self.waiting = Gauge("densessm_requests_waiting", "requests queued or reading their prompt", registry=r)
        self.batch_size = Histogram(
            "densessm_batch_occupancy",
            "rows in the batch at each decode step",
            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})),
            registry=r,
        )
        self.queue_time = Histogram(
            "densessm_queue_time_seconds", "from arrival to the start of prompt reading", buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "densessm_time_to_first_token_seconds", "from arrival to the first token", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "densessm_time_per_output_token_seconds",
            "between two tokens of a completion",
            buckets=_TOKEN_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "densessm_request_latency_seconds", "from arrival to the last token", buckets=_LATENCY, registry=r
        )
        self.cache_hits = Counter(
            "densessm_prefix_cache_hits", "prompts that continued from a cached state", registry=r
        )
        self.cache_misses = Counter("densessm_prefix_cache_misses", "prompts read from the start", registry=r)
        self.cache_hit_tokens = Counter(
            "densessm_prefix_cache_hit_tokens", "prompt tokens not read again thanks to a cached state", registry=r
        )
        self.cache_bytes = Gauge("densessm_prefix_cache_bytes", "bytes of cached prompt states", registry=r)
        self.cache_entries = Gauge("densessm_prefix_cache_entries", "cached prompt states", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
