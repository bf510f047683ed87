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
    """404: no such task."""


class TooLarge(APIError):
    """413: body, image or artifact over the server's limit."""


class NotAnImage(APIError):
    """415: the server could not read the bytes as an image."""


class InvalidArtifact(APIError):
    """422: the uploaded artifact failed validation (the message names the field)."""


class Unavailable(APIError):
    """503: overloaded, not ready, or the registry is down; retried before it is raised."""


class Timeout(APIError):
    """504: the server gave up on the request."""


class InsufficientStorage(APIError):
    """507: the server's registry cannot store (disk full, read-only, Redis out of memory);
    not retried: the message says what its operator has to do."""


class TransportError(PiggyError):
    """The server could not be reached, or the connection failed mid-request."""


_BY_STATUS = {
    400: BadRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    413: TooLarge,
    415: NotAnImage,
    422: InvalidArtifact,
    503: Unavailable,
    504: Timeout,
    507: InsufficientStorage,
}


def api_error(status: int, code: str, message: str, retry_after: float | None = None) -> APIError:
    """The APIError subclass for `status`."""
    return _BY_STATUS.get(status, APIError)(status, code, message, retry_after)
