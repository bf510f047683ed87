"""piggy-serve: run the server with uvicorn, or as a Ray Serve application with `--ray`
(`--demo`: the bundled offline demo)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import logging
import signal
import socket
import sys

import torch
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from piggyback_serve._pipes import quiet_when_the_reader_leaves
from piggyback_serve.masks.errors import MasksError
from piggyback_serve.server.engine.placement import frontend_count
from piggyback_serve.server.registry import RegistryError, open_registry
from piggyback_serve.server.settings import Settings

log = logging.getLogger("piggy.serve")

EPILOG = """exit status: 0 after a clean stop (SIGTERM or SIGINT: requests already received are
answered first); 1 when the server cannot start (the listen address is in use or not
available, a bad PIGGY_REGISTRY, demo tasks missing); 2 for a bad command line; 3 when the
application fails during startup."""

# On SIGTERM, a connection with no request in hand (just accepted, its headers not all read
# yet, or an idle keep-alive one a client may be reusing this very moment) is given this
# long for a request to arrive, which is then answered (Connection: close), before closing.
SHUTDOWN_IDLE_GRACE_S = 1.0
HEADER_TIMEOUT_S = Settings.model_fields["header_timeout_s"].default  # defined once


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="piggy-serve",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="serve the demo backbone and tasks from $PIGGY_HOME/demo/tasks, "
        "installing them there first if absent",
    )
    p.add_argument("--host", help="listen address (default PIGGY_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default PIGGY_PORT or 8000)")
    p.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Serve application: a local Ray, or the cluster in RAY_ADDRESS; "
        "--host/--port set Ray's HTTP proxy (needs the `ray` extra)",
    )
    p.add_argument(
        "--frontends",
        type=int,
        help="HTTP front-end processes sharing the port and one engine service (default "
        "PIGGY_FRONTENDS, or enough to feed the device: 1 on the CPU, the cores the GPUs "
        "leave on CUDA)",
    )
    p.add_argument("--replicas", type=int, help="with --ray: replicas, one engine each (1)")
    p.add_argument(
        "--replica-cpus",
        type=float,
        help="with --ray: CPUs Ray reserves per replica, fractions allowed (1; a GPU each "
        "where the cluster has GPUs)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    given = (("host", args.host), ("port", args.port), ("frontends", args.frontends))
    overrides = {k: v for k, v in given if v is not None}
    if args.demo:
        from piggyback_serve.masks.demo import DEMO_BACKBONE

        overrides.update(demo=True, backbone=DEMO_BACKBONE)
    return Settings(**overrides)


def prepare_demo(settings: Settings):
    """Install the bundled demo tasks into the demo folder unless all are there; the backbone."""
    from pathlib import Path

    from piggyback_serve.masks import demo
    from piggyback_serve.masks.backbones import load_backbone

    backbone = load_backbone(settings.backbone, settings.backbone_weights)
    folder = Path(settings.registry_url.removeprefix("dir:"))
    have = {p.name for p in folder.glob("*.safetensors")}
    bundled = {p.name for p in demo.BUNDLED_DIR.glob("*.safetensors")}
    if settings.registry_url.startswith("dir:") and not (have and bundled <= have):
        installed = demo.install(folder, backbone)
        print(f"piggy-serve: installed {len(installed)} demo tasks into {folder}", flush=True)
    return backbone


def main(argv: list[str] | None = None) -> int:
    return quiet_when_the_reader_leaves(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.ray and (args.replicas is not None or args.replica_cpus is not None):
        p.error("--replicas and --replica-cpus need --ray")
    if (args.replicas or 1) < 1 or (args.replica_cpus or 1) <= 0:
        p.error("--replicas must be at least 1 and --replica-cpus above 0")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from(args)
    count = 1 if args.ray else frontend_count(settings)
    workspace = None
    if count > 1:  # before the app (and prometheus_client) is imported: see metrics.py
        from piggyback_serve.server.frontends import make_workspace

        workspace = make_workspace()
    from piggyback_serve.server.app import create_app

    if not args.ray:  # bound first: a busy port fails at once, not after the demo loads
        try:
            sock = listen_socket(settings.host, settings.port)
        except OSError as exc:
            message = bind_error(settings.host, settings.port, exc)
            print(f"piggy-serve: error: {message}", file=sys.stderr)
            return 1
    backbone = None
    if settings.demo:
        try:
            backbone = prepare_demo(settings)
        except MasksError as exc:
            print(
                f"piggy-serve: error: {exc}\n(run `piggy-masks demo --rebuild` to build the "
                "demo tasks)",
                file=sys.stderr,
            )
            return 1
    try:
        open_registry(settings.registry_url)  # a bad PIGGY_REGISTRY fails here, not mid-startup
    except RegistryError as exc:
        print(f"piggy-serve: error: {exc}", file=sys.stderr)
        return 1
    if args.ray:
        return _run_ray(
            settings,
            args.replicas or 1,
            args.replica_cpus or 1.0,
            args.log_level,
        )
    if workspace is not None:
        from piggyback_serve.server.frontends import Supervisor

        return Supervisor(settings, sock, backbone, count, args.log_level, workspace).run()
    return serve(create_app(settings, backbone), sock, args.log_level, settings)


def serve(app, sock: socket.socket, log_level: str, settings: Settings) -> int:
    """uvicorn on a bound socket, with the app's settings, until SIGTERM or SIGINT: 0 after
    a clean stop, 3 when the app failed during startup."""
    # This process decodes and resizes (masks.decode.fit: torch's kernel), in a thread per
    # request: one torch thread each, as the engine workers run, not a pool per call.
    torch.set_num_threads(1)
    host, port = sock.getsockname()[:2]  # for uvicorn's "running on" line
    http = functools.partial(DrainingHTTP, header_timeout_s=settings.header_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http)
    server = _Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (stops accepting, lets in-flight
    # requests finish, runs the lifespan's shutdown), then re-raises the signal to the
    # handler in place before it started: with these no-ops a clean stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return 0 if server.started else 3


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound as uvicorn binds one (SO_REUSEADDR; IPv6 for an address
    with a colon): bound here, before the backbone loads, so that a busy port fails at once.
    `reuse_port`: one of several on the port, the kernel spreading connections among them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def bind_error(host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where} is already in use (another server is listening there); choose another "
            "port with --port or PIGGY_PORT"
        )
    return (
        f"cannot listen on {where} ({exc.strerror or exc}); check --host/PIGGY_HOST and "
        "--port/PIGGY_PORT"
    )


class _Server(uvicorn.Server):
    """uvicorn's server on a socket bound beforehand; says where it listens as uvicorn does."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            self._log_started_message(sockets)

    async def shutdown(self, sockets=None) -> None:
        # A connection the kernel has completed but the loop has not accepted yet holds a
        # request already sent; closing the listening socket would reset it. Take them in
        # first (they are served like any connection the shutdown finds, see DrainingHTTP),
        # then stop listening at once, with no await between the last look and the close.
        loop, taken = asyncio.get_running_loop(), 0
        while pending := [conn for sock in sockets or [] for conn in _accept_pending(sock)]:
            for conn in pending:
                await loop.connect_accepted_socket(self._protocol, conn)
            taken += len(pending)
        for server in self.servers:
            server.close()
        if taken:
            log.info("shutdown: took in %d connections waiting to be accepted", taken)
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )


def _accept_pending(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting in the listening socket's accept queue, without blocking."""
    conns = []
    try:
        sock.setblocking(False)
        while True:
            conns.append(sock.accept()[0])
    except OSError:  # BlockingIOError: the queue is empty
        pass
    return conns


class DrainingHTTP(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, except that its graceful shutdown answers a request arriving,
    and that a connection must send each request head within `header_timeout_s`.

    uvicorn's `shutdown()` closes at once every connection with no request in hand: one just
    accepted whose request is still on the wire, one whose headers are half read, an idle
    keep-alive one that a client has just sent its next request on. Such a client has sent
    its request and reads a closed connection ("Server disconnected without sending a
    response"). Here such a connection gets SHUTDOWN_IDLE_GRACE_S for a request to arrive;
    one that does is answered with Connection: close; one that stays silent is closed.

    uvicorn bounds an idle keep-alive connection (its keep-alive timeout, disarmed by any
    byte), but not one that sends a head slowly: a byte every few seconds held it open for
    ever, a file descriptor each. Here the head must be whole within `header_timeout_s` of
    the connection opening or of the previous answer, or the connection is closed. A body's
    pace is not bounded here (its size is, by the app's limits): docs/reliability.md.
    """

    _draining = False
    _drain_timer: asyncio.TimerHandle | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args, header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def _await_head(self) -> None:
        """No request in hand: the next head must be whole in time."""
        self._stop_awaiting_head()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _stop_awaiting_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _in_hand(self) -> bool:
        """A request whose head is whole and whose answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and not self._in_hand():
            self.transport.close()

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()  # a request in hand: answered, then the connection closes
            return
        self._draining = True
        self._unset_keepalive_if_required()
        self._drain_timer = self.loop.call_later(SHUTDOWN_IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            super().shutdown()  # still no request: closed before reading one

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_hand():
            self._stop_awaiting_head()
            if self._draining:
                self.cycle.keep_alive = False  # the request that arrived: answered, then closed

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._draining:  # not kept alive past the one answer (pipelined requests too)
            self._unset_keepalive_if_required()
        if not self.transport.is_closing() and not self._in_hand():  # none pipelined
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_awaiting_head()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().connection_lost(exc)


def _run_ray(settings: Settings, replicas: int, replica_cpus: float, log_level: str) -> int:
    """Each replica loads its own backbone: the one loaded here for --demo stays here."""
    try:
        from piggyback_serve.server import ray_app
    except ImportError as exc:
        print(f"piggy-serve: error: --ray needs the `ray` extra ({exc})", file=sys.stderr)
        return 1
    try:
        return ray_app.run(settings, replicas, replica_cpus, log_level)
    except ray_app.RayConfigError as exc:
        print(f"piggy-serve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
