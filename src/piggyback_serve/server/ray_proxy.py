"""What Ray's HTTP proxy answers by itself, in our JSON error shape.

Ray's proxy answers some requests without any replica: the replica holding the request
died (it then closes with no answer at all, which its server turns into a bare 500), its
request timeout (408), back-pressure or no replica (503), an unknown route (404). Ray
imports middlewares() through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH; the middleware
turns each of those into `{"error": {"code", "message"}}`. A lost replica answers 503
`replica_lost` with Retry-After, so clients that retry 503s (ours does) go on elsewhere.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

# Ray's status -> ours: (status, code). Anything else keeps its status, code `proxy_error`.
STATUS = {
    404: (404, "not_found"),
    408: (504, "timeout"),  # Ray's request_timeout_s: our "timed out" is 504
    500: (503, "replica_lost"),
    503: (503, "unavailable"),
}
RETRY_AFTER = b"1"


def middlewares() -> list[Middleware]:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.ray_proxy.middlewares"""
    return [Middleware(ProxyErrorsAsJson)]


class ProxyErrorsAsJson:
    """Pure ASGI middleware around Ray's proxy app: replica answers (JSON) pass unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: dict | None = None  # the start of a plain-text error, rewritten at its end
        body = bytearray()

        async def rewrite(message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and not _is_json(message.get("headers", ())):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    await _send_error(send, held["status"], body.decode(errors="replace"))
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as exc:  # noqa: BLE001 - nothing may leave the proxy without an answer
            if started:
                raise
            await _send_error(send, 500, f"{type(exc).__name__}: {exc}")
            return
        if not started:
            await _send_error(send, 500, "the replica holding this request was lost")


def _is_json(headers) -> bool:
    for key, value in headers:
        if key.lower() == b"content-type":
            return b"json" in value.lower()
    return False


async def _send_error(send, ray_status: int, message: str) -> None:
    status, code = STATUS.get(ray_status, (ray_status, "proxy_error"))
    body = json.dumps({"error": {"code": code, "message": message.strip()[:500]}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", RETRY_AFTER))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
