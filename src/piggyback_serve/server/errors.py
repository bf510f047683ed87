"""The server's errors and the one place they become HTTP responses.

Every error answers `{"error": {"code": "...", "message": "..."}}`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from piggyback_serve.masks.errors import ArtifactError, MasksError

log = logging.getLogger("piggy.serve")


class ServeError(Exception):
    """Base of every error the server answers with; subclasses fix status and code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServeError):
    status, code = 400, "bad_request"


class Unauthorized(ServeError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class Forbidden(ServeError):
    status, code = 403, "forbidden"


class TaskNotFound(ServeError):
    status, code = 404, "task_not_found"


class PayloadTooLarge(ServeError):
    status, code = 413, "payload_too_large"


class NotAnImage(ServeError):
    status, code = 415, "unsupported_media_type"


class InvalidArtifact(ServeError):
    status, code = 422, "invalid_artifact"


class InvalidArchive(ServeError):
    """A training archive refused: unsafe, too big once expanded, or not a folder per class
    with enough images (server/jobs/archive.py); the message says which and what to do."""

    status, code = 422, "invalid_archive"


class JobNotFound(ServeError):
    status, code = 404, "job_not_found"


class JobFinished(ServeError):
    """A cancel for a training job that already ended."""

    status, code = 409, "job_finished"


class BatchFailed(ServeError):
    """The engine raised while running a batch: only that batch's requests get it."""

    status, code = 500, "batch_failed"


class Overloaded(ServeError):
    status, code = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class WorkerLost(ServeError):
    """The engine worker running this request's batch died (killed, out of memory); it is
    being replaced, and only that batch's requests get this."""

    status, code = 503, "worker_lost"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class NotReady(ServeError):
    status, code = 503, "not_ready"


class RegistryUnavailable(ServeError):
    status, code = 503, "registry_unavailable"


class Timeout(ServeError):
    status, code = 504, "timeout"


class InsufficientStorage(ServeError):
    """The registry is reachable but cannot store (disk full, read-only, not permitted,
    Redis out of memory): retrying won't help until someone acts, as the message says."""

    status, code = 507, "insufficient_storage"

    def __init__(self, message: str, reason: str = "unknown"):
        super().__init__(message)
        self.reason = reason  # the label of piggy_registry_write_errors_total


def rebuilt(
    status: int, code: str, message: str, headers: dict[str, str], reason: str | None = None
) -> ServeError:
    """An error the engine service answered (server/protocol.py's Refused), as raised there."""
    if code == InsufficientStorage.code:  # counted by the front end that answers it
        return InsufficientStorage(message, reason or "unknown")
    error = ServeError(message, headers)
    error.status, error.code = status, code
    return error


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad parameter",
    401: "Token missing (admin token; predict token where one is set)",
    403: "Token wrong",
    404: "Unknown task or job",
    409: "The job already ended",
    413: "Body, image, artifact or archive too large",
    415: "Not an image",
    422: "Invalid artifact or training archive",
    500: "The batch holding this request failed (the server goes on)",
    503: "Overloaded, an engine worker lost (see Retry-After), or not ready",
    504: "Timed out",
    507: "The registry cannot store: disk full, read-only, not permitted, Redis out of memory",
}


def responses(*codes: int) -> dict[int, dict]:
    """OpenAPI `responses=` for a route: the error body under each status it can answer."""
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request.state.error_code = code  # for the metrics middleware
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


def install(app: FastAPI) -> None:
    """Map every exception the app can meet to the one error shape."""

    @app.exception_handler(ServeError)
    async def _serve(request: Request, exc: ServeError):
        if isinstance(exc, InsufficientStorage):
            _count_storage_error(request, exc)
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ArtifactError)
    async def _artifact(request: Request, exc: ArtifactError):
        return error_response(request, 422, "invalid_artifact", str(exc))

    @app.exception_handler(MasksError)
    async def _masks(request: Request, exc: MasksError):
        log.error("masks error: %s", exc)
        return error_response(request, 500, "masks_error", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(request, 400, "bad_request", "; ".join(parts) or "bad request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(request, exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, "internal_error", "internal server error")


def _count_storage_error(request: Request, exc: InsufficientStorage) -> None:
    """Counted where the 507 is answered: with front ends, the engine service's refusal is
    answered (and counted) by the front end, once."""
    log.error("%s", exc.message)
    svc = getattr(request.app.state, "services", None)
    if svc is not None:
        svc.metrics.registry_write_errors.labels(exc.reason).inc()
