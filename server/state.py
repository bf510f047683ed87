"""What one app instance holds (on app.state.services): built in the lifespan, no globals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.batcher import Batcher
from server.catalog import Catalog
from server.engine import Engine
from server.errors import NotReady
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    engine: Engine
    registry: Registry
    batcher: Batcher
    catalog: Catalog | None = None  # set once the backbone is loaded
    startup_error: str | None = None
    background: list = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.catalog is not None and self.engine.ready

    def require_catalog(self) -> Catalog:
        if self.catalog is None:
            why = self.startup_error or "the backbone is still loading"
            raise NotReady(f"not ready: {why}", {"Retry-After": "1"})
        return self.catalog

    def snapshot(self) -> dict[str, float]:
        """Values exported to /metrics at scrape time."""
        cache = self.engine.cache
        return {
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_evictions": cache.evictions,
            "cache_bytes": cache.bytes,
            "cache_budget_bytes": cache.budget_bytes,
            "cache_entries": len(cache),
            "tasks_registered": len(self.catalog.tasks) if self.catalog else 0,
            "queue_depth": self.batcher.depth(),
            "ready": float(self.ready and not self.catalog.registry_error),
        }


def services(request: Request) -> Services:
    """FastAPI dependency: this app's services."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]
