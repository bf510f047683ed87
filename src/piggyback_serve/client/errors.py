"""The client's exceptions: one base, the server's errors by status, and transport failures."""

from __future__ import annotations


class PiggyError(Exception):
    """Base of everything the client raises."""


class APIError(PiggyError):
    """The server answered with an error: its HTTP status, snake_case `code` and `message`."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after  # seconds, when the server said (503)


class BadRequest(APIError):
    """400: a bad parameter."""


class AuthError(APIError):
    """401 / 403: the admin token is missing or wrong."""


class NotFound(APIError):
    """404: no such task (task_not_found) or training job (job_not_found)."""


class Conflict(APIError):
    """409: a cancel for a training job that already ended (job_finished)."""


class TooLarge(APIError):
    """413: body, image or artifact over the server's limit."""


class NotAnImage(APIError):
    """415: the server could not read the bytes as an image."""


class InvalidArtifact(APIError):
    """422: the uploaded artifact failed validation (the message names the field)."""


class InvalidArchive(InvalidArtifact):
    """422 invalid_archive: a training archive refused (unsafe, too big expanded, too many
    files, fewer than two classes, a class with too few images: the message says which)."""


class Unavailable(APIError):
    """503: overloaded, not ready, or the registry is down; retried before it is raised."""


class Timeout(APIError):
    """504: the server gave up on the request."""


class InsufficientStorage(APIError):
    """507: the server's registry cannot store (disk full, read-only, Redis out of memory);
    not retried: the message says what its operator has to do."""


class TransportError(PiggyError):
    """The server could not be reached, or the connection failed mid-request."""


class JobFailed(PiggyError):
    """A training job ended failed (Job.raise_for_state): `job`, and its error's `code` and
    `message` (the server's, e.g. invalid_archive)."""

    def __init__(self, job):
        error = job.error
        self.job = job
        self.code = error.code if error else job.state
        self.message = error.message if error else f"the job was {job.state}"
        super().__init__(f"job {job.id} ({job.task}) {job.state}: {self.code}: {self.message}")


class JobCancelled(JobFailed):
    """A training job ended cancelled (Job.raise_for_state)."""


class JobTimeout(PiggyError, TimeoutError):
    """wait() gave up before the job ended; `job` is the last state seen (None if none)."""

    def __init__(self, job_id: str, timeout: float, job=None):
        state = f", still {job.state}" if job is not None else ""
        super().__init__(f"job {job_id} not finished after {timeout:g} s{state}")
        self.job_id, self.timeout, self.job = job_id, timeout, job


_BY_STATUS = {
    400: BadRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: NotAnImage,
    422: InvalidArtifact,
    503: Unavailable,
    504: Timeout,
    507: InsufficientStorage,
}


# A finer class than the status's, for some codes (still a subclass of the status's class).
_BY_CODE = {(422, "invalid_archive"): InvalidArchive}


def api_error(status: int, code: str, message: str, retry_after: float | None = None) -> APIError:
    """The APIError subclass for `status` (and `code`)."""
    cls = _BY_CODE.get((status, code)) or _BY_STATUS.get(status, APIError)
    return cls(status, code, message, retry_after)
