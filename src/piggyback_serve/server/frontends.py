"""Several HTTP front ends on one port, one engine service: `piggy-serve --frontends N`.

This process is the supervisor and the engine service: it runs the app's services without
HTTP (the engine pool, the batcher that forms batches across every front end and task, the
catalog of task states) behind a Unix socket (server/service_socket.py), and starts N
front-end processes (server/frontend.py), each with its own event loop parsing HTTP and
decoding images. Each front end listens on its own socket on the one port (SO_REUSEPORT):
the kernel spreads connections evenly among them, where one shared socket gave every
connection of a burst to whichever front end woke first (8 of 8, measured). The
supervisor holds every socket too, so that connections wait in a socket's queue while its
front end starts or is replaced, rather than being refused or reset.

A front end that exits while the server runs is replaced. SIGTERM or SIGINT here drains:
every front end is told to stop (each answers the requests it holds, through the engine,
which stays up), then the engine stops. Exit status as the single-process server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from piggyback_serve.server.settings import Settings

if TYPE_CHECKING:
    from piggyback_serve.masks.backbones import Backbone

# prometheus_client's multiprocess mode: read when it is first imported, so set before the
# app is (this module imports it only once running).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0  # before replacing a front end that exited
DRAIN_MARGIN_S = 10.0  # past the request timeout, a front end still draining is killed


def make_workspace() -> Path:
    """A private folder for the engine service's socket and the metrics' shared files;
    PROMETHEUS_MULTIPROC_DIR points into it from now on, for this process and the front
    ends it starts (server/metrics.py). Call it before prometheus_client is imported."""
    folder = Path(tempfile.mkdtemp(prefix="piggy-serve-"))
    (folder / "metrics").mkdir()
    os.environ[MULTIPROCESS_DIR] = str(folder / "metrics")
    return folder


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        backbone: Backbone | None,
        count: int,
        log_level: str,
        workspace: Path,
    ):
        self.settings, self.probe, self.backbone = settings, sock, backbone
        self.sockets: list[socket.socket] = []  # one per front end, made when running
        self.count, self.log_level = count, log_level
        self.processes: dict[int, asyncio.subprocess.Process] = {}  # slot -> process
        self._folder = workspace
        self.address = str(self._folder / "engine.sock")

    def run(self) -> int:
        try:
            return asyncio.run(self._run())
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    async def _run(self) -> int:
        from piggyback_serve.server.app import close, services_for, start
        from piggyback_serve.server.cli import listen_socket
        from piggyback_serve.server.service_socket import ServiceSocket

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # The port was bound (and found free) before the backbone loaded; now one socket
        # per front end takes it over. Connections queue in them until a front end runs.
        host, port = self.probe.getsockname()[:2]
        self.probe.close()
        for _ in range(self.count):
            self.sockets.append(listen_socket(host, port, reuse_port=True))
            self.sockets[-1].listen(2048)
        svc = services_for(self.settings, self.backbone)
        svc.batcher.start()
        service = ServiceSocket(svc, self.address)
        await service.start()
        svc.background.append(asyncio.create_task(start(svc), name="piggy-startup"))
        log.info(
            "engine service at %s; starting %d front ends on %s",
            self.address,
            self.count,
            _where(self.sockets[0]),
        )
        keepers = [asyncio.create_task(self._keep(slot, stop)) for slot in range(self.count)]
        await stop.wait()
        log.info("stopping: draining %d front ends", len(self.processes))
        for sock in self.sockets:  # the front ends' copies close as they finish draining
            sock.close()
        for process in list(self.processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*keepers, return_exceptions=True)
        await service.close()
        await close(svc)
        return 0

    async def _keep(self, slot: int, stop: asyncio.Event) -> None:
        """Run front end `slot` until the server stops, replacing it when it exits."""
        while not stop.is_set():
            process = await self._spawn(slot)
            self.processes[slot] = process
            stopped = asyncio.create_task(stop.wait())
            exited = asyncio.create_task(process.wait())
            await asyncio.wait({stopped, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                stopped.cancel()
                if stop.is_set():
                    break
                log.error(
                    "front end %d (pid %d) exited with %s; replacing it",
                    slot,
                    process.pid,
                    process.returncode,
                )
                await asyncio.sleep(RESTART_DELAY_S)
                continue
            # Stopping: the supervisor sent SIGTERM; wait for the drain, within bounds.
            try:
                await asyncio.wait_for(exited, self.settings.request_timeout_s + DRAIN_MARGIN_S)
            except TimeoutError:
                log.error("front end %d did not drain in time: killed", slot)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self.processes.pop(slot, None)

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        fd = self.sockets[slot].fileno()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "piggyback_serve.server.frontend",
            "--fd",
            str(fd),
            "--engine",
            self.address,
            "--log-level",
            self.log_level,
            pass_fds=(fd,),
            env=self._environment(),
        )
        log.info("front end %d started (pid %d)", slot, process.pid)
        return process

    def _environment(self) -> dict[str, str]:
        """This process's settings as a front end reads them: the environment, plus what
        the command line set (server/cli.py's settings_from)."""
        s = self.settings
        env = dict(os.environ)
        env.update(
            PIGGY_HOST=s.host,
            PIGGY_PORT=str(s.port),
            PIGGY_BACKBONE=s.backbone,
            PIGGY_REGISTRY=s.registry_url,
            PIGGY_DEMO="true" if s.demo else "false",
            PIGGY_FRONTENDS=str(self.count),
        )
        return env


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
