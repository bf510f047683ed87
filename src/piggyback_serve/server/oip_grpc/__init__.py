"""The Open Inference Protocol over gRPC: `start` serves GRPCInferenceService (service.py) on
PIGGY_GRPC_PORT inside the app's lifespan, `stop` ends it.

Bound with SO_REUSEPORT (grpc's default, asked for explicitly), so that several front-end
processes of one app share the port as they share the HTTP one. A port that cannot be bound
fails the start, as a busy HTTP port does (server/cli.py), rather than serving without
gRPC unnoticed.
"""

from __future__ import annotations

import logging

import grpc

from piggyback_serve.server.settings import Settings
from piggyback_serve.server.state import Services

log = logging.getLogger("piggy.serve")

# The body limit applies to a whole message; past it grpc answers RESOURCE_EXHAUSTED before
# the message is read whole. This much more leaves room for the message's own fields.
HEADER_ROOM = 64 * 1024
STOP_GRACE_S = 5.0


class GrpcBindError(RuntimeError):
    """PIGGY_GRPC_PORT could not be bound."""


async def start(svc: Services, settings: Settings) -> grpc.aio.Server | None:
    """GRPCInferenceService on settings.host:settings.grpc_port, started; None when the
    port is 0 (off)."""
    if not settings.grpc_port:
        return None
    from piggyback_serve.server.oip_grpc.service import InferenceService

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", settings.max_body_bytes + HEADER_ROOM),
        ]
    )
    server.add_generic_rpc_handlers((InferenceService(svc).handler(),))
    address = _address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # newer grpc raises, older returns 0
        port = 0
    if not port:
        raise GrpcBindError(
            f"cannot listen for gRPC on {address} (PIGGY_GRPC_PORT): the port is in use by "
            "another program, or the address is not this host's; set PIGGY_GRPC_PORT=0 "
            "to serve without gRPC"
        )
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server


async def stop(server: grpc.aio.Server | None) -> None:
    """Stop taking calls and let those in flight finish, for STOP_GRACE_S at most."""
    if server is not None:
        await server.stop(STOP_GRACE_S)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
