"""Prometheus metrics of the server: requests, tokens, latencies, queue, adapters, cache."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class EngineCollector:
    """Values read from the engine and the adapter store at scrape time."""

    def __init__(self, engine, store):
        self.engine, self.store = engine, store

    def collect(self):
        e, s = self.engine, self.store
        yield GaugeMetricFamily("lorq_queue_depth", "requests waiting for a batch slot", value=e.queue_depth)
        yield GaugeMetricFamily("lorq_running_sequences", "sequences in the running batch", value=len(e.running))
        yield CounterMetricFamily("lorq_engine_steps", "packed forward passes run", value=e.steps)
        yield CounterMetricFamily("lorq_preemptions", "running sequences sent back to the queue to keep the KV cache within its budget", value=e.preemptions)
        yield GaugeMetricFamily("lorq_kv_cache_bytes", "bytes of the KV cache pool", value=e.pool.nbytes)
        yield GaugeMetricFamily("lorq_adapters_registered", "adapters that can be requested", value=len(s.names))
        yield GaugeMetricFamily("lorq_adapter_cache_adapters", "adapters whose weights are in the cache", value=len(s.cache))
        yield GaugeMetricFamily("lorq_adapter_cache_bytes", "bytes of adapter weights in the cache", value=s.nbytes)
        yield GaugeMetricFamily("lorq_adapter_cache_budget_bytes", "the cache's byte budget", value=s.budget)
        yield CounterMetricFamily("lorq_adapter_cache_hits", "requests whose adapter was in the cache", value=s.stats.hits)
        yield CounterMetricFamily("lorq_adapter_cache_misses", "requests whose adapter was read from disk", value=s.stats.misses)
        yield CounterMetricFamily("lorq_adapter_cache_evictions", "adapters evicted to stay within the budget", value=s.stats.evictions)


class Metrics:
    def __init__(self, engine, store):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorq_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lorq_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("lorq_generation_tokens", "tokens generated", registry=r)
        self.adapter_requests = Counter("lorq_adapter_requests", "generation requests per model (base or adapter)", ["model"], registry=r)
        self.finished = Counter("lorq_finished_sequences", "finished sequences by reason", ["reason"], registry=r)
        self.latency = Histogram("lorq_request_latency_seconds", "time from arrival to the last token", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorq_time_to_first_token_seconds", "time from arrival to the first token", buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(engine, store))

    def sequence_done(self, seq, finished_at: float) -> None:
        self.prompt_tokens.inc(len(seq.prompt))
        self.generation_tokens.inc(len(seq.generated))
        self.finished.labels(seq.finish_reason).inc()
        self.latency.observe(finished_at - seq.arrival)
        if seq.first_token is not None:
            self.ttft.observe(seq.first_token - seq.arrival)

    def text(self) -> bytes:
        return generate_latest(self.registry)
