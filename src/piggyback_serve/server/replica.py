"""`X-Piggy-Replica: <host>:<pid>` on every answer: who answered, with or without Ray."""

from __future__ import annotations

import os
import socket

HEADER = "X-Piggy-Replica"


def replica_id() -> str:
    """This process as a replica: `<host>:<pid>` (the pod's name on Kubernetes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ReplicaHeader:
    """Pure ASGI middleware that adds the header to every HTTP response start."""

    def __init__(self, app) -> None:
        self.app = app
        self.header = (HEADER.lower().encode(), replica_id().encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
