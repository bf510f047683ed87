"""The application factory: create_app(settings) wires the parts; the lifespan owns them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.server import auth, errors, oip_grpc, open_files
from piggyback_serve.server.arena import Arena
from piggyback_serve.server.artifact_cache import ArtifactCache
from piggyback_serve.server.batcher import Batcher
from piggyback_serve.server.catalog import Catalog
from piggyback_serve.server.engine import EnginePool
from piggyback_serve.server.engine_client import EngineClient
from piggyback_serve.server.jobs.manager import JobManager
from piggyback_serve.server.jobs.store import open_job_store
from piggyback_serve.server.metrics import Metrics, RequestMetrics
from piggyback_serve.server.registry import REMOTE_SCHEMES, open_registry
from piggyback_serve.server.replica import ReplicaHeader
from piggyback_serve.server.routes import docs, oip, page, routers
from piggyback_serve.server.settings import Settings
from piggyback_serve.server.state import Services

log = logging.getLogger("piggy.serve")

FRONTEND_READY_WAIT_S = 15.0  # past it a front end serves /healthz and 503s while it starts

DESCRIPTION = """Many image classifiers ("tasks") on one frozen backbone: each task is a
binary mask over the backbone's weights plus a small head (Piggyback).
Errors answer `{"error": {"code": "...", "message": "..."}}`."""


def create_app(
    settings: Settings | None = None,
    backbone: Backbone | None = None,
    engine_address: str | None = None,
) -> FastAPI:
    """A new app; `backbone` lets a caller that already loaded one (the CLI, tests) share it.
    With `engine_address` the app is a front end of the engine service listening there
    (server/service_socket.py) and runs no engine of its own."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = services_for(settings, backbone, engine_address)
        app.state.services = svc
        grpc_server = await oip_grpc.start(svc, settings)  # None when PIGGY_GRPC_PORT=0
        if svc.remote is None:
            svc.batcher.start()
        # The backbone loads in the background so /healthz and /readyz answer meanwhile.
        startup = asyncio.create_task(start(svc), name="piggy-startup")
        svc.background.append(startup)
        if svc.remote is not None:
            # A front end takes connections once it can answer them, within a bound: its
            # socket holds them meanwhile, while the other front ends serve theirs.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(startup), FRONTEND_READY_WAIT_S)
        try:
            yield
        finally:
            await oip_grpc.stop(grpc_server)
            await close(svc)

    app = FastAPI(
        title="piggyback-serve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc: server/routes/docs.py, offline
        redoc_url=None,
    )
    errors.install(app)
    for router in (*routers, oip.router, page.router, docs.router):
        app.include_router(router)
    app.mount("/web", page.assets(), name="web")
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    app.add_middleware(RequestMetrics)
    if settings.cors_origin_list:  # off unless asked for: no CORS header is ever sent
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Inference-Header-Content-Length"],
            expose_headers=["Retry-After", "Inference-Header-Content-Length", "X-Piggy-Replica"],
        )
    app.add_middleware(ReplicaHeader)  # added last: outermost, so every answer carries it
    return app


def services_for(
    settings: Settings, backbone: Backbone | None, engine_address: str | None = None
) -> Services:
    """The app's parts, not started: the engine in this process, or the engine service's
    client at `engine_address`."""
    metrics = Metrics()
    registry = open_registry(settings.registry_url, settings.redis_prefix, settings.redis_timeout_s)
    if engine_address is not None:
        remote = EngineClient(engine_address)
        svc = Services(settings, metrics, remote, registry, remote, remote=remote)
    else:
        engine = EnginePool(settings, backbone)
        batcher = Batcher(
            engine,
            metrics,
            settings.max_batch_size,
            settings.max_delay_ms / 1000,
            settings.queue_size,
        )
        svc = Services(settings, metrics, engine, registry, batcher, arena=Arena())
    svc.jobs = open_job_store(
        settings.registry_url, settings.redis_prefix, settings.redis_timeout_s
    )
    metrics.watch(svc.snapshot)
    return svc


async def close(svc: Services) -> None:
    """Stop what `start` started, last started first."""
    for task in svc.background:
        task.cancel()
    await asyncio.gather(*svc.background, return_exceptions=True)
    if svc.catalog is not None:
        await svc.catalog.close()
    if svc.remote is None:
        await svc.batcher.close()
    await svc.engine.close()
    await svc.registry.close()
    await svc.jobs.close()
    if svc.arena is not None:
        svc.arena.close()


async def start(svc: Services) -> None:
    """Load the backbone and the workers (or reach the engine service), then the catalog."""
    auth.warn_if_admin_open(svc.settings)
    open_files.raise_soft_limit()
    try:
        if not svc.registry.url.startswith(REMOTE_SCHEMES):
            await svc.registry.ping()
        loaded = await svc.engine.start()
    except Exception as exc:
        svc.startup_error = f"{type(exc).__name__}: {exc}"
        log.error("startup failed: %s", svc.startup_error)
        return
    # A remote registry that is down at startup is an outage like any later one: the
    # catalog records it (/readyz says so) and the watcher keeps trying until it returns.
    catalog = Catalog(
        svc.registry,
        loaded,
        None if svc.remote else svc.engine.prepare,
        on_change=svc.engine.forget,
        rescan_s=svc.settings.registry_rescan_s,
        host_budget=host_state_budget(svc.settings),
        loads=svc.settings.task_loads,
        remote=svc.remote,
        # Where the engine runs: a local copy of the artifacts, for a registry reset.
        cache=None if svc.remote else ArtifactCache.for_settings(svc.settings),
    )
    await catalog.refresh()
    svc.catalog = catalog
    if svc.remote is not None:
        svc.remote.reload = catalog.reload
    log.info(
        "ready: backbone %s, %d engine workers on %s, %d tasks from %s (%d invalid), "
        "task states kept up to %d MB in host memory",
        loaded.name,
        svc.engine.alive,
        svc.engine.device,
        len(catalog.tasks),
        svc.registry.url,
        len(catalog.failed),
        catalog.host.budget // 10**6,
    )
    svc.background.append(asyncio.create_task(catalog.watch()))
    if svc.remote is None:  # where the engine runs: training jobs too (server/jobs/manager.py)
        manager = JobManager(svc.settings, svc.jobs, catalog.put, svc.metrics)
        svc.background.append(asyncio.create_task(manager.run(), name="piggy-jobs"))


def host_state_budget(settings: Settings) -> int:
    """PIGGY_HOST_STATE_BYTES, or a quarter of the memory free now."""
    if settings.host_state_bytes is not None:
        return settings.host_state_bytes
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // 4
