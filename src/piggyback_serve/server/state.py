"""What one app instance holds (on app.state.services): built in the lifespan, no globals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from fastapi import Depends, Request

from piggyback_serve.server.arena import Arena, ArenaFull, Encoded
from piggyback_serve.server.batcher import Batcher
from piggyback_serve.server.catalog import Catalog, Task
from piggyback_serve.server.engine import EnginePool
from piggyback_serve.server.engine.tier import TierStats
from piggyback_serve.server.engine_client import EngineClient
from piggyback_serve.server.errors import NotReady, Overloaded, TaskNotFound
from piggyback_serve.server.jobs.store import JobStore
from piggyback_serve.server.metrics import UNKNOWN_TASK, Metrics, note_task
from piggyback_serve.server.protocol import PixelRef
from piggyback_serve.server.registry import Registry
from piggyback_serve.server.settings import Settings


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    engine: EnginePool | EngineClient
    registry: Registry
    batcher: Batcher | EngineClient
    catalog: Catalog | None = None  # set once the backbone is loaded
    startup_error: str | None = None
    background: list = field(default_factory=list)
    # Where this process runs the engine itself: the arena its pixels go through. Where it
    # is a front end of an engine service (PIGGY_FRONTENDS > 1): the service's client.
    arena: Arena | None = None
    remote: EngineClient | None = None
    # Training jobs' records, beside the tasks in the registry (server/jobs/store.py).
    jobs: JobStore | None = None

    @property
    def decode_on_device(self) -> bool:
        """JPEGs go to the engine encoded (PIGGY_DECODE; auto: where the engine is CUDA)."""
        mode = self.settings.decode
        if mode != "auto":
            return mode == "device"
        return str(self.engine.device).startswith("cuda")

    @property
    def ready(self) -> bool:
        return self.catalog is not None and self.engine.ready

    def require_catalog(self) -> Catalog:
        if self.catalog is None:
            why = self.startup_error or "the backbone is still loading"
            raise NotReady(f"not ready: {why}", {"Retry-After": "1"})
        return self.catalog

    def find_task(self, request: Request, name: str) -> Task:
        """The task a request names (404 unknown, 503 not ready or registry down), noted on
        the request for the metrics; a name that is no task is noted as UNKNOWN_TASK, so
        that random names add no label values."""
        try:
            task = self.require_catalog().get(name)
        except TaskNotFound:
            note_task(request, UNKNOWN_TASK)
            raise
        note_task(request, task.name)
        return task

    async def classify(
        self, task: Task, images: list[torch.Tensor | Encoded], started: float
    ) -> tuple[Task, list[torch.Tensor]]:
        """Softmax probabilities per image from the engine, and the task that answered
        (its labels apply); 504 past the request timeout from `started` (perf_counter).
        The one step /predict, OIP REST and OIP gRPC share."""
        timeout_s = self.settings.request_timeout_s
        if self.remote is not None:
            return await self.remote.classify(task, images, started, timeout_s)
        try:
            with self.arena.holding(images) as refs:
                return await self.classify_pixels(task, refs, started, timeout_s)
        except ArenaFull as exc:
            raise Overloaded(f"too many images in flight: {exc}") from None

    async def classify_pixels(
        self, task: Task, rows: list[PixelRef], started: float, timeout_s: float
    ) -> tuple[Task, list[torch.Tensor]]:
        """`classify` for pixels already in shared memory (the engine service's step): the
        task's state made ready (built on first use), then batched."""
        ready = await self.require_catalog().resident(task)
        return ready, await self.batcher.submit_within(ready, rows, started, timeout_s)

    def failed(self) -> dict[str, str]:
        """Tasks listed but not served (name -> why): what the catalog found invalid, and
        where an engine service builds the states, what it found invalid on first use."""
        found = dict(self.remote.failed) if self.remote is not None else {}
        if self.catalog is not None:
            found.update(self.catalog.failed)
        return found

    def held(self) -> int:
        """Tasks served here that a registry reset took from the registry (catalog.py):
        the engine service's count where there is one, which holds their copies."""
        if self.remote is not None:
            return self.remote.held
        return len(self.catalog.held) if self.catalog is not None else 0

    def tasks_loaded(self) -> int:
        """Task states ready in host memory (the engine service's, where there is one)."""
        host = self.tiers().get("host")
        return host.resident if host is not None else 0

    def tiers(self) -> dict[str, TierStats]:
        """Each tier of task states: host (the catalog's), device (the workers', summed)."""
        found = {"host": self.catalog.host.stats()} if self.catalog else {}
        if self.remote is not None:  # the engine service's catalog holds the states
            found = {"host": self.remote.host_tier} if self.remote.host_tier else {}
        if (device := self.engine.device_tier) is not None:
            found["device"] = device
        return found

    def snapshot(self) -> dict:
        """Values exported to /metrics at scrape time (`workers`: one WorkerInfo each)."""
        engine = self.engine
        catalog = self.catalog
        tasks = list(catalog.tasks.values()) if catalog else []
        workers = engine.workers()
        tiers = self.tiers()
        return {
            "task_switches": sum(w.switches for w in workers),
            "mixed_batches": sum(w.mixed for w in workers),
            "task_state_bytes": tiers["host"].bytes if "host" in tiers else 0,
            "tiers": tiers,
            "tasks_failed": len(self.failed()),
            "device_task_state_bytes": engine.device_state_bytes,
            "working_copy_bytes": engine.working_copy_bytes,
            "tasks_registered": len(tasks),
            "queue_depth": self.batcher.depth(),
            "engine_workers": len(workers),
            "engine_workers_alive": engine.alive,
            "ready": float(self.ready and not self.catalog.registry_error),
            "registry_reset": float((held := self.held()) > 0),
            "tasks_held": held,
            "workers": workers,
        }


async def services(request: Request) -> Services:
    """FastAPI dependency: this app's services (async: run inline, not in a thread pool)."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]
