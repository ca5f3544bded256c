"""``/metrics``: the server's and the expert cache's figures in the Prometheus text format.

Server: requests by endpoint and status code, requests waiting and running, prompt and completion
tokens, generation seconds, tokens/s over the server's busy time, request latency and time to
first token (histograms). Cache (``handle.stats()`` read at each scrape, under the generator's
lock): hits, misses, ready rate, hit rate, evictions, bytes copied, stall seconds, decode tokens/s
and the experts run on the CPU (hybrid execution). Names are prefixed ``moecache_``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (stats key, metric name, kind, help) of the cache figures exported.
CACHE_FIGURES = (
    ("hits", "moecache_cache_hits", "counter", "expert accesses served from the device pool"),
    ("misses", "moecache_cache_misses", "counter", "expert accesses that needed a copy (or a CPU run)"),
    ("evictions", "moecache_cache_evictions", "counter", "experts evicted from the pool"),
    ("bytes_copied", "moecache_cache_bytes_copied", "counter", "host-to-device bytes copied"),
    ("stall_s", "moecache_cache_stall_seconds", "counter", "time the computation waited for copies"),
    ("cpu_experts", "moecache_cache_cpu_experts", "counter", "missed experts run on the CPU (hybrid)"),
    ("prefetch_issued", "moecache_cache_prefetch_issued", "counter", "prefetch copies queued"),
    ("hit_rate", "moecache_cache_hit_rate", "gauge", "hits / accesses since start"),
    ("ready_rate", "moecache_cache_ready_rate", "gauge", "accesses whose expert copy had completed / accesses"),
    ("decode_tokens_per_s", "moecache_decode_tokens_per_second", "gauge", "decode tokens per second of model time"),
)


class _CacheCollector:
    def __init__(self, handle: Any, scheduler: Any):
        self.handle = handle
        self.scheduler = scheduler

    def collect(self) -> Any:
        s = self.scheduler
        yield _gauge("moecache_requests_waiting", "requests in line", s.waiting)
        yield _gauge("moecache_requests_running", "requests being generated", 0 if s.running is None else 1)
        yield _counter("moecache_prompt_tokens", "prompt tokens of finished requests", s.prompt_tokens)
        yield _counter("moecache_completion_tokens", "tokens generated for finished requests", s.completion_tokens)
        yield _counter("moecache_generation_seconds", "time the worker spent generating", s.busy_s)
        yield _gauge("moecache_tokens_per_second", "completion tokens per second of generation time",
                     s.completion_tokens / s.busy_s if s.busy_s else 0.0)
        yield _counter("moecache_requests_cancelled", "requests whose client went away", s.cancelled)
        if self.handle is None or self.handle.removed:
            return
        with s.generator.lock:
            stats = self.handle.stats()
        for key, name, kind, doc in CACHE_FIGURES:
            value = stats.get(key)
            if value is None:
                continue
            yield (_counter if kind == "counter" else _gauge)(name, doc, float(value))
        cfg = stats.get("config", {})
        yield _gauge("moecache_cache_slots", "experts the device pool holds", cfg.get("slots", 0))
        yield _gauge("moecache_cache_total_experts", "experts of the model", cfg.get("total_experts", 0))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """A registry of its own per server (several servers in one process do not mix figures)."""

    def __init__(self, handle: Any, scheduler: Any):
        self.registry = CollectorRegistry()
        self.requests = Counter("moecache_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("moecache_request_seconds", "time from arrival to the last byte of an answer",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("moecache_time_to_first_token_seconds", "time from arrival to the first text",
                              registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.registry.register(_CacheCollector(handle, scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)
