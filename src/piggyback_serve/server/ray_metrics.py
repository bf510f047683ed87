"""Our `piggy_*` metrics into Ray's metrics system, per replica, so that Prometheus scrapes
them where it scrapes Ray: each node's metrics port (Ray prefixes them `ray_`).

Through Ray's proxy, `/metrics` answers from whichever replica took the request; a replica
has no address of its own to scrape. So each replica copies its registry's samples into
`ray.util.metrics` gauges, tagged with `replica` (its X-Piggy-Replica), at every Serve
health check (every 2 s). Counters arrive as gauges of their running totals: rate() and
increase() work on them as on counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from ray.util.metrics import Gauge

from piggyback_serve.server.replica import replica_id


class RayMetricsBridge:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.replica = replica_id()
        self.gauges: dict[str, Gauge] = {}

    def export(self) -> None:
        """Copy every sample now (Ray's agent reads the gauges on its own schedule)."""
        for family in self.registry.collect():
            for sample in family.samples:
                gauge = self._gauge(sample.name, family.documentation, tuple(sample.labels))
                gauge.set(sample.value, tags={**sample.labels, "replica": self.replica})

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        if name not in self.gauges:
            self.gauges[name] = Gauge(name, doc or name, tag_keys=(*labels, "replica"))
        return self.gauges[name]
