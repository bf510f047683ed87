"""Prometheus metrics, one CollectorRegistry per app (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "piggy_requests",
            "HTTP requests by route, task and status",
            ["route", "task", "status"],
            registry=r,
        )
        self.errors = Counter(
            "piggy_errors", "Error answers by task and error code", ["task", "code"], registry=r
        )
        self.images = Counter("piggy_images", "Images classified", ["task"], registry=r)
        self.queue_wait = Histogram(
            "piggy_queue_wait_seconds",
            "Time an image waited in its task queue",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "piggy_compute_seconds",
            "Engine time per batch (materialise if cold + forward)",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "piggy_batch_size", "Images per engine batch", buckets=BATCH_BUCKETS, registry=r
        )

    def watch(self, state: Callable[[], dict[str, float]]) -> None:
        """Export values read at scrape time (cache counters, queue depth, task count)."""
        self.registry.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    COUNTERS = {
        "cache_hits": "Weight cache hits",
        "cache_misses": "Weight cache misses (a task materialised)",
        "cache_evictions": "Weight cache evictions",
    }
    GAUGES = {
        "cache_bytes": "Bytes of materialised weights cached",
        "cache_budget_bytes": "Weight cache budget",
        "cache_entries": "Tasks with weights in the cache",
        "tasks_registered": "Tasks the server knows",
        "queue_depth": "Images waiting in task queues",
        "ready": "1 when the backbone is loaded and the registry reachable",
    }

    def __init__(self, state: Callable[[], dict[str, float]]):
        self.state = state

    def collect(self):
        values = self.state()
        for key, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"piggy_{key}", doc, value=values.get(key, 0))
        for key, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"piggy_{key}", doc, value=values.get(key, 0))

    def describe(self):
        return []
