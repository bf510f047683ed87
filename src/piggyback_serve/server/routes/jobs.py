"""Training jobs: POST /tasks/{name}/train, GET /jobs, GET/DELETE /jobs/{id}, the events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from piggyback_serve.masks.artifact import check_description
from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.server.auth import require_admin
from piggyback_serve.server.catalog import insufficient
from piggyback_serve.server.errors import (
    BadRequest,
    InsufficientStorage,
    JobFinished,
    JobNotFound,
    PayloadTooLarge,
    RegistryUnavailable,
    responses,
)
from piggyback_serve.server.jobs import archive
from piggyback_serve.server.jobs.manager import images_folder, replica_name
from piggyback_serve.server.jobs.model import Job, JobData, JobList, TrainOptions
from piggyback_serve.server.jobs.store import JobStore
from piggyback_serve.server.registry import RegistryError, StorageError
from piggyback_serve.server.registry.base import STORAGE_ADVICE, STORAGE_ERRNOS
from piggyback_serve.server.routes.tasks import TaskName, _checked
from piggyback_serve.server.state import ServicesDep

router = APIRouter(tags=["jobs"])
CANCEL_WAIT_S = 10.0  # DELETE waits this long for the trainer to stop before answering
EVENT_WAIT_S = 1.0  # the events stream reads the job again at least this often
PING_S = 15  # a comment line on an idle stream, so that proxies keep it open

ARCHIVE_BODY = {
    "requestBody": {
        "required": True,
        "description": "a zip, tar or tar.gz of one folder of images per class (at its root "
        "or inside one top folder), as torchvision's ImageFolder reads",
        # Any content type: the format is read from the bytes (zip, tar, tar.gz).
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/tasks/{name}/train",
    status_code=202,
    response_model=Job,
    dependencies=[Depends(require_admin)],
    responses=responses(400, 401, 403, 413, 422, 503, 507),
    summary="Learn a task from a folder of images per class: a training job",
    description="Answers at once with the job (`Location: /jobs/{id}`) once the archive is "
    "unpacked and checked; the job trains in the background and, when it succeeds, the task "
    "is stored as an upload is and served by every replica. Options left out take "
    "`piggy-masks train`'s defaults.",
    openapi_extra=ARCHIVE_BODY,
)
async def train_task(
    request: Request,
    name: TaskName,
    options: Annotated[TrainOptions, Query()],
    svc: ServicesDep,
) -> JSONResponse:
    name = _checked(name)
    svc.require_catalog()
    try:
        check_description(options.description)
    except ArtifactError as exc:
        raise BadRequest(f"description: {exc}") from None
    settings = svc.settings
    _check_length(request, settings.max_archive_bytes)
    job = Job.new(name, options, JobData(classes=[], images=0), replica_name())
    into = images_folder(settings, job.id)
    unpacked = into.parent / "unpacked"
    try:
        folder = await _unpack(request, unpacked, archive.ArchiveLimits.of(settings))
        data = JobData(classes=folder.classes, images=folder.images, skipped=folder.skipped)
        job = job.model_copy(update={"data": data})
        await _stored(svc.jobs.put(job))
        # Last: the images in place make the job its replica's to run (server/jobs/manager.py).
        await asyncio.to_thread(folder.root.rename, into)
    except BaseException:
        shutil.rmtree(into.parent, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    return JSONResponse(
        job.model_dump(mode="json"), status_code=202, headers={"Location": f"/jobs/{job.id}"}
    )


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"archive of {int(declared):,} bytes is over the server's limit of {limit:,} bytes "
            "(PIGGY_MAX_ARCHIVE_BYTES)"
        )


async def _unpack(request: Request, unpacked, limits: archive.ArchiveLimits) -> archive.ImageFolder:
    """The body streamed into the job's folder under the size limit, then unpacked and
    checked into `unpacked`."""
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    upload = unpacked.parent / "upload"
    try:
        await archive.receive(request.stream(), upload, limits.max_bytes)
        return await asyncio.to_thread(archive.unpack, upload, unpacked, limits)
    except OSError as exc:
        reason = STORAGE_ERRNOS.get(exc.errno)
        if reason is None:
            raise
        raise InsufficientStorage(
            f"cannot unpack the archive under {unpacked.parent.parent}: {exc.strerror}; "
            f"{STORAGE_ADVICE[reason]}",
            reason,
        ) from None
    finally:
        upload.unlink(missing_ok=True)


async def _stored(write):
    """A job store write: its outage a 503, a full disk or Redis a 507, as uploads answer."""
    try:
        return await write
    except StorageError as exc:
        raise insufficient(exc, "cannot store the job") from exc
    except RegistryError as exc:
        raise RegistryUnavailable(f"registry unavailable: {exc}") from exc


async def _job(store: JobStore, job_id: str) -> Job:
    job = await _stored(store.get(job_id))  # None for an id that is no job's, too
    if job is None:
        raise JobNotFound(f"no job {job_id!r} (GET /jobs lists them)")
    return job


@router.get("/jobs", response_model=JobList, responses=responses(503), summary="Training jobs")
async def list_jobs(svc: ServicesDep) -> JobList:
    return JobList(jobs=await _stored(svc.jobs.list()))


@router.get("/jobs/{job_id}", response_model=Job, responses=responses(404, 503), summary="One job")
async def get_job(job_id: str, svc: ServicesDep) -> Job:
    return await _job(svc.jobs, job_id)


@router.delete(
    "/jobs/{job_id}",
    response_model=Job,
    dependencies=[Depends(require_admin)],
    responses=responses(401, 403, 404, 409, 503, 507),
    summary="Cancel a queued or running job",
    description="Answers the job once its trainer stopped (`cancelled`), or as it is after a "
    "few seconds if the replica running it has not stopped it yet.",
)
async def cancel_job(job_id: str, svc: ServicesDep) -> Job:
    store = svc.jobs
    job = await _job(store, job_id)
    if job.done:
        raise JobFinished(f"job {job_id} already {job.state}")
    await _stored(store.ask_cancel(job_id))
    deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
    while not job.done and asyncio.get_running_loop().time() < deadline:
        await store.wait(job_id, EVENT_WAIT_S)
        job = await _job(store, job_id)
    return job


@router.get(
    "/jobs/{job_id}/events",
    responses={
        **responses(404, 503),
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    },
    summary="A job's progress as Server-Sent Events",
    description="An event `job` whose data is the job, at once and at every change; the "
    "stream ends after the event whose state is final (succeeded, failed, cancelled).",
)
async def job_events(job_id: str, svc: ServicesDep) -> EventSourceResponse:
    first = await _job(svc.jobs, job_id)  # 404 before the stream starts
    return EventSourceResponse(_changes(svc.jobs, first), ping=PING_S)


async def _changes(store: JobStore, job: Job) -> AsyncIterator[dict]:
    shown = None
    while True:
        seen = job.model_dump(mode="json", exclude={"updated"})
        if seen != shown:
            shown = seen
            yield {"event": "job", "data": json.dumps(job.model_dump(mode="json"))}
        if job.done:
            return
        await store.wait(job.id, EVENT_WAIT_S)
        with contextlib.suppress(RegistryError):  # an outage: the stream waits it out
            job = await store.get(job.id) or job
