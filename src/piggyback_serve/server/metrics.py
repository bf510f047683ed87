"""Prometheus metrics, one CollectorRegistry per app (no process-global state).

With several front ends (server/frontends.py) each process counts in files under
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set by the supervisor
before anything imports prometheus_client), and a scrape of any front end reads them all:
requests of every front end, batches of the engine service."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from piggyback_serve.server.frontends import MULTIPROCESS_DIR
from piggyback_serve.server.registry.base import STORAGE_ADVICE

# The `task` label of a request that named no known task: not a valid task name, so it can't
# be mistaken for one, and random names in requests add no label values.
UNKNOWN_TASK = "(unknown)"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if shared := os.environ.get(MULTIPROCESS_DIR):
            # Values live in the shared files: the collector reads every process's.
            MultiProcessCollector(self.registry, path=shared)
            r = None
        self.requests = Counter(
            "piggy_requests",
            "HTTP requests by route, task and status",
            ["route", "task", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "piggy_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method, status class and task",
            ["route", "method", "status_class", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "piggy_errors", "Error answers by task and error code", ["task", "code"], registry=r
        )
        self.images = Counter("piggy_images", "Images classified", ["task"], registry=r)
        self.registry_write_errors = Counter(
            "piggy_registry_write_errors",
            "Uploads and deletes the registry could not store (507), by reason",
            ["reason"],
            registry=r,
        )
        for reason in STORAGE_ADVICE:  # shown at 0 from the start, so that rate() sees the first
            self.registry_write_errors.labels(reason)
        self.queue_wait = Histogram(
            "piggy_queue_wait_seconds",
            "Time an image waited in its task queue",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "piggy_compute_seconds",
            "Engine time per batch (patch switch + forward, all its tasks)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "piggy_batch_size", "Images per engine batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "piggy_batch_tasks",
            "Distinct tasks per engine batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

        self.jobs = Counter(
            "piggy_jobs", "Training jobs ended on this replica, by state", ["state"], registry=r
        )
        for state in ("succeeded", "failed", "cancelled"):
            self.jobs.labels(state)
        self.jobs_running = Gauge(
            "piggy_jobs_running",
            "Training jobs running on this replica",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.job_seconds = Histogram(
            "piggy_job_seconds",
            "Wall time of a training job that succeeded, from its start",
            buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )

    def watch(self, state: Callable[[], dict]) -> None:
        """Export values read at scrape time (engine counters, queue depth, task count)."""
        self.registry.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def note_task(request, name: str) -> None:
    """Record the task a request is for, as its `task` label (RequestMetrics reads it)."""
    request.state.task = name


class _StateCollector(Collector):
    COUNTERS = {
        "task_switches": "Working-copy patches: a batch led by another task than the last",
        "mixed_batches": "Engine batches with more than one task",
    }
    GAUGES = {
        "task_state_bytes": "Bytes of task state the server holds (sparse patches, heads, BN)",
        "device_task_state_bytes": "Bytes of task state copied to the device (0 on the CPU)",
        "working_copy_bytes": "Bytes of the masked weights' working copy and its pristine twin",
        "tasks_registered": "Tasks the server knows (listed from the registry)",
        "tasks_failed": "Tasks listed but not served: their artifact is invalid",
        "queue_depth": "Images waiting in task queues",
        "engine_workers": "Engine workers in the pool",
        "engine_workers_alive": "Engine workers running (ready for batches)",
        "ready": "1 when the backbone is loaded and the registry reachable",
        "registry_reset": "1 while the registry is found reset and tasks served here are held",
        "tasks_held": "Tasks served here that a registry reset took from the registry",
    }
    # Per engine worker (label `worker`: its index in the pool).
    WORKER_COUNTERS = {
        "batches": "Batches the worker ran",
        "switches": "Working-copy patches on the worker",
        "restarts": "Times the worker was replaced after dying",
    }
    WORKER_GAUGES = {
        "alive": "1 while the worker runs (ready for batches)",
        "busy": "1 while the worker runs a batch",
    }

    # Per tier of task states (label `tier`: host, device), from engine.tier.TierStats.
    TIER_GAUGES = {
        "resident": ("piggy_tier_tasks", "Task states kept ready in the tier"),
        "bytes": ("piggy_tier_bytes", "Bytes of the task states in the tier"),
        "budget": ("piggy_tier_budget_bytes", "Bytes the tier may hold"),
    }
    TIER_COUNTERS = {
        "hits": ("piggy_tier_hits", "Requests whose task state was in the tier"),
        "misses": ("piggy_tier_misses", "Requests whose task state had to be built"),
        "evictions": ("piggy_tier_evictions", "Task states evicted to stay within budget"),
    }

    def __init__(self, state: Callable[[], dict]):
        self.state = state

    def collect(self):
        values = self.state()
        for key, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"piggy_{key}", doc, value=values.get(key, 0))
        for key, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"piggy_{key}", doc, value=values.get(key, 0))
        tiers = values.get("tiers", {})
        for key, (name, doc) in self.TIER_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["tier"])
            for tier, t in tiers.items():
                family.add_metric([tier], getattr(t, key))
            yield family
        for key, (name, doc) in self.TIER_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["tier"])
            for tier, t in tiers.items():
                family.add_metric([tier], getattr(t, key))
            yield family
        workers = values.get("workers", [])
        for key, doc in self.WORKER_COUNTERS.items():
            family = CounterMetricFamily(f"piggy_worker_{key}", doc, labels=["worker"])
            for w in workers:
                family.add_metric([str(w.index)], getattr(w, key))
            yield family
        for key, doc in self.WORKER_GAUGES.items():
            family = GaugeMetricFamily(f"piggy_worker_{key}", doc, labels=["worker"])
            for w in workers:
                value = w.state == "ready" if key == "alive" else w.busy
                family.add_metric([str(w.index)], float(value))
            yield family

    def describe(self):
        return []


# Methods that keep their own label value; any other (a client may send any token) is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED = "unmatched"  # the route label of a request no route or mount took


class RequestMetrics:
    """Pure ASGI middleware: counts and times every answer by route, task and status.

    Pure ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs
    each request in its own task group and re-streams the response, which profiling put
    at a visible share of the event loop's time per /predict.

    Every label is bounded: the route is its template (`/tasks/{name}`, never the path),
    the method one of METHODS or "other", the task a known one (or UNKNOWN_TASK).
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        root_path = scope.get("root_path", "")
        status = 500  # an exception that escapes every handler ends as a 500

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self._record(scope, status, route_of(scope, root_path), started)

    @staticmethod
    def _record(scope, status: int, route: str, started: float) -> None:
        svc = getattr(scope["app"].state, "services", None)
        if svc is None:
            return
        # request.state lives in scope["state"]: routes and error handlers note the task
        # (note_task) and the error code there.
        state = scope.get("state", {})
        task = state.get("task", "")
        method = scope["method"] if scope["method"] in METHODS else "other"
        svc.metrics.latency.labels(route, method, f"{status // 100}xx", task).observe(
            time.perf_counter() - started
        )
        svc.metrics.requests.labels(route, task, str(status)).inc()
        if code := state.get("error_code"):
            svc.metrics.errors.labels(task, code).inc()


def route_of(scope, root_path: str) -> str:
    """The route template that answered: the router notes a route in the scope; a mount
    (static files: /web, /docs-assets) extends root_path by its prefix, as ASGI has it."""
    path = getattr(scope.get("route"), "path", None)
    mounted = scope.get("root_path", "")[len(root_path) :]
    if mounted:
        return f"{mounted}/{{path}}"
    return path or UNMATCHED
