"""Bearer tokens: the admin token guards /tasks writes, the optional predict token guards
predictions. Compared in constant time; never logged, never echoed in a response."""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from pydantic import SecretStr

from piggyback_serve.server.errors import Forbidden, Unauthorized
from piggyback_serve.server.settings import Settings
from piggyback_serve.server.state import ServicesDep

log = logging.getLogger("piggy.serve")


def admin_open(settings: Settings) -> bool:
    """True when no admin token is set: anyone who reaches the server can upload and delete."""
    return settings.admin_token is None


def warn_if_admin_open(settings: Settings) -> None:
    if admin_open(settings):
        log.warning(
            "PIGGY_ADMIN_TOKEN is not set: uploads and deletes (PUT/DELETE /tasks) are open "
            "to anyone who can reach this server; set it before exposing the port"
        )


# The dependencies are `async def` though they never await: FastAPI runs a plain-function
# dependency in a thread pool, a thread hop per request that profiling put at a fifth of
# the HTTP side's CPU under load.


async def require_admin(request: Request, svc: ServicesDep) -> None:
    """Bearer admin token, when one is set: 401 without one, 403 when it is wrong."""
    check_bearer(request, "admin", svc.settings.admin_token)


async def require_predict(request: Request, svc: ServicesDep) -> None:
    """Bearer predict token (or the admin token), when a predict token is set."""
    settings = svc.settings
    if settings.predict_token is not None:
        check_bearer(request, "predict", settings.predict_token, settings.admin_token)


def check_bearer(request: Request, what: str, *tokens: SecretStr | None) -> None:
    """401 without a bearer token, 403 unless it equals one of `tokens` (all None: open)."""
    wanted = [t.get_secret_value().encode() for t in tokens if t is not None]
    if not wanted:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(f"this route needs Authorization: Bearer <{what} token>")
    given_bytes = given.strip().encode()
    # Every token is compared (no short-circuit), each in constant time.
    matches = [hmac.compare_digest(given_bytes, w) for w in wanted]
    if not any(matches):
        raise Forbidden(f"wrong {what} token")
