"""POST /registry/restore: write the tasks held through a registry reset back into it."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from piggyback_serve.server.auth import require_admin
from piggyback_serve.server.errors import responses
from piggyback_serve.server.state import ServicesDep

router = APIRouter(tags=["registry"])


class Restore(BaseModel):
    restored: list[str] = Field(description="tasks written back into the registry")
    failed: dict[str, str] = Field(description="tasks that could not be, each with why")
    registry: str = Field(description="the registry's URL")


@router.post(
    "/registry/restore",
    response_model=Restore,
    dependencies=[Depends(require_admin)],
    responses=responses(401, 403, 503, 507),
    summary="Write the tasks served here back into a registry found reset",
    description="A registry that came back empty (Redis restarted without its data, flushed; "
    "a folder emptied) is not obeyed as a delete of every task: each replica serves on what "
    "it knew, and /readyz says `degraded`. This writes those tasks back from the replica's "
    "local copies of their artifacts; every replica then serves them from the registry again.",
)
async def restore(svc: ServicesDep) -> Restore:
    catalog = svc.require_catalog()
    restored, failed = await catalog.restore()
    return Restore(restored=restored, failed=failed, registry=svc.registry.url)
