"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from piggyback_serve.server.auth import admin_open
from piggyback_serve.server.errors import responses
from piggyback_serve.server.schemas import Health, Liveness
from piggyback_serve.server.state import ServicesDep

router = APIRouter(tags=["health"])
SHOWN_FAILURES = 10


@router.get("/healthz", response_model=Liveness, summary="Liveness: the process answers")
async def healthz(svc: ServicesDep) -> Liveness:
    return Liveness(status="ok", admin="open" if admin_open(svc.settings) else "token")


@router.get(
    "/readyz",
    response_model=Health,
    responses=responses(503),
    summary="Readiness: backbone loaded and registry reachable",
)
async def readyz(svc: ServicesDep):
    catalog = svc.catalog
    if catalog is None:
        why = svc.startup_error or "the backbone is still loading"
        return _not_ready(f"not ready: {why}")
    if catalog.registry_error:  # down, or not read whole: what is missing can't be told
        return _not_ready(f"registry {svc.registry.url} unreadable: {catalog.registry_error}")
    engine = svc.engine
    if not engine.alive:  # none ready: starting, hung (being killed) or being replaced
        states = Counter(w.state for w in engine.workers())
        shown = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        return _not_ready(f"not ready: no engine worker can serve ({shown}; being replaced)")
    held = svc.held()
    return Health(
        status="degraded" if held else "ready",
        degraded=(
            f"registry reset: {held} tasks served here are not in the registry "
            "(POST /registry/restore writes them back)"
            if held
            else None
        ),
        held=held,
        backbone=engine.backbone.name,
        registry=svc.registry.url,
        tasks=len(catalog.tasks),
        tasks_loaded=svc.tasks_loaded(),
        tasks_failed=len(failed := svc.failed()),
        failed=dict(sorted(failed.items())[:SHOWN_FAILURES]),
        workers=engine.workers(),
    )


def _not_ready(message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": "not_ready", "message": message}},
        status_code=503,
        headers={"Retry-After": "1"},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(svc: ServicesDep) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
