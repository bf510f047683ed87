"""GET/PUT/DELETE /tasks: list, inspect, upload and remove tasks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from piggyback_serve.server.auth import require_admin
from piggyback_serve.server.body import read_limited
from piggyback_serve.server.errors import BadRequest, responses
from piggyback_serve.server.metrics import note_task
from piggyback_serve.server.registry import NAME_PATTERN, valid_name
from piggyback_serve.server.schemas import TaskInfo, TaskList
from piggyback_serve.server.state import ServicesDep

router = APIRouter(tags=["tasks"])
TaskName = Annotated[str, Path(description=f"task name, {NAME_PATTERN}")]
ONE_TASK = "/tasks/{name}"


def _checked(name: str) -> str:
    if not valid_name(name):
        raise _invalid(name)
    return name


def _invalid(name: str) -> BadRequest:
    return BadRequest(f"invalid task name {name!r}: must match {NAME_PATTERN}")


@router.get(
    "/tasks", response_model=TaskList, responses=responses(503), summary="Every registered task"
)
async def list_tasks(svc: ServicesDep) -> TaskList:
    catalog = svc.require_catalog()
    return TaskList(tasks=[TaskInfo.of(t) for _, t in sorted(catalog.tasks.items())])


@router.get(
    ONE_TASK, response_model=TaskInfo, responses=responses(400, 404, 503), summary="One task"
)
async def get_task(request: Request, name: TaskName, svc: ServicesDep) -> TaskInfo:
    return TaskInfo.of(svc.find_task(request, _checked(name)))


@router.put(
    ONE_TASK,
    response_model=TaskInfo,
    status_code=201,
    dependencies=[Depends(require_admin)],
    responses=responses(400, 401, 403, 413, 422, 503, 507),
    summary="Upload (or replace) a task: the artifact file as the raw body",
    description="The task is served under the URL's name whatever the artifact's own `task` "
    "field says; the answer's `artifact_task` is that field, so a client can see a mismatch.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def put_task(request: Request, name: TaskName, svc: ServicesDep) -> TaskInfo:
    name = _checked(name)
    catalog = svc.require_catalog()
    data = await read_limited(
        request, svc.settings.max_artifact_bytes, "artifact", "PIGGY_MAX_ARTIFACT_BYTES"
    )
    task = await catalog.put(name, data)  # ArtifactError → 422, registry untouched
    note_task(request, task.name)
    return TaskInfo.of(task)


@router.delete(
    ONE_TASK,
    status_code=204,
    dependencies=[Depends(require_admin)],
    responses=responses(400, 401, 403, 404, 503, 507),
    summary="Remove a task",
)
async def delete_task(name: TaskName, svc: ServicesDep) -> Response:
    name = _checked(name)
    catalog = svc.require_catalog()
    if not await catalog.delete(name):
        raise catalog.not_found(name)
    return Response(status_code=204)


# Registered last. A name with a slash in it (`..%2Fetc`, decoded) matches none of the
# routes above; it gets the same 400 as any other invalid name, not the router's bare 404.
@router.api_route("/tasks/{name:path}", methods=["GET", "PUT", "DELETE"], include_in_schema=False)
async def slashed_name(name: str) -> None:
    raise _invalid(name)
