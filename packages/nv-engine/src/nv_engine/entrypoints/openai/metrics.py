"""Prometheus metrics under vLLM's names, with the `nv:` prefix."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nv_engine.engine.async_llm import AsyncLLM, RequestTimes
from nv_engine.outputs import RequestOutput

# vLLM's buckets (seconds)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0)  # fmt: skip


class _SchedulerCollector(Collector):
    """Read at scrape time from the engine core's latest stats: requests running and waiting,
    KV-cache usage and the prefix cache's counts (in prompt tokens, as vLLM counts them)."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def collect(self) -> Iterator:
        s = self.engine.stats
        values = (
            (GaugeMetricFamily, "nv:num_requests_running", "Requests in the running batch",
             s.num_running),
            (GaugeMetricFamily, "nv:num_requests_waiting", "Requests waiting to be scheduled",
             s.num_waiting),
            (GaugeMetricFamily, "nv:kv_cache_usage_perc", "Fraction of KV-cache blocks in use",
             1 - s.num_free_blocks / s.num_blocks),
            (CounterMetricFamily, "nv:prefix_cache_queries", "Prompt tokens looked up",
             s.prefix_cache_queries),
            (CounterMetricFamily, "nv:prefix_cache_hits", "Prompt tokens found cached",
             s.prefix_cache_hits),
            (CounterMetricFamily, "nv:num_preemptions", "Requests preempted",
             s.num_preemptions),
        )  # fmt: skip
        for family, name, doc, value in values:
            metric = family(name, doc, labels=list(self.labels))
            metric.add_metric(list(self.labels.values()), value)
            yield metric


class ServerMetrics:
    """The server's registry; `record` is the AsyncLLM's stat logger (it sees every output)."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(engine, model_name))
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(
                model_name
            )

        self.prompt_tokens = counter("nv:prompt_tokens", "Prompt tokens of requests served")
        self.generation_tokens = counter("nv:generation_tokens", "Tokens generated")
        self.ttft = histogram(
            "nv:time_to_first_token_seconds", "Time to first token", _TTFT_BUCKETS
        )
        self.itl = histogram(
            "nv:inter_token_latency_seconds", "Time between output tokens", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "nv:e2e_request_latency_seconds", "Request latency, arrival to end", _E2E_BUCKETS
        )
        self._success = Counter(
            "nv:request_success", "Requests finished", ["model_name", "finished_reason"],
            registry=self.registry,
        )  # fmt: skip
        self._model_name = model_name
        self._gauge_up = Gauge("nv:engine_healthy", "1 while the engine can serve", labels,
                               registry=self.registry).labels(model_name)  # fmt: skip
        self._gauge_up.set_function(lambda: float(engine.is_healthy()))

    def record(self, out: RequestOutput, times: RequestTimes, num_new_tokens: int) -> None:
        now = time.monotonic()
        if num_new_tokens:
            if times.first_token is None:
                self.ttft.observe(now - times.arrival)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                for c in out.outputs:  # each completion that advanced: its tokens' spacing
                    for _ in c.delta_token_ids:
                        self.itl.observe((now - times.last_token) / len(c.delta_token_ids))
            self.generation_tokens.inc(num_new_tokens)
        if out.finished:
            self.e2e.observe(now - times.arrival)
            for c in out.outputs:
                self._success.labels(self._model_name, c.finish_reason or "abort").inc()
