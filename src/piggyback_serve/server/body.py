"""Request bodies read under a byte limit: refused early, never buffered past it."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest

from piggyback_serve.server.errors import BadRequest, PayloadTooLarge


async def read_limited(
    request: Request, limit: int, what: str = "body", setting: str = "PIGGY_MAX_BODY_BYTES"
) -> bytes:
    """The whole body, or 413 as soon as Content-Length or the bytes received pass `limit`;
    the 413 names `setting`, the server's environment variable that sets the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if size > limit:
            raise PayloadTooLarge(
                f"{what} of {size:,} bytes is over the server's limit of {limit:,} bytes "
                f"({setting})"
            )
    chunks, received = [], 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:  # chunked uploads have no Content-Length to check first
                raise PayloadTooLarge(
                    f"{what} is over the server's limit of {limit:,} bytes ({setting})"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        # An ordinary error (nobody is left to read it), not an exception out of the app
        # that the ASGI server would log with a traceback for every vanished client.
        raise BadRequest(f"the client went away after {received:,} bytes of the {what}") from None
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes, max_files: int) -> FormData:
    """Multipart form of an already read body (Starlette parses from a replayed stream)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await StarletteRequest(request.scope, replay).form(
            max_files=max_files, max_fields=max_files + 16
        )
    except HTTPException as exc:
        # Starlette says 400 for every multipart problem; too many images is a size limit.
        if str(exc.detail).startswith("Too many files"):
            raise PayloadTooLarge(
                f"more than {max_files} images in one request (PIGGY_MAX_IMAGES)"
            ) from None
        raise
