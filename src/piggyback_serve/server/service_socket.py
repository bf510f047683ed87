"""The engine service's socket: front-end processes submit here (server/engine_client.py).

The service is the app's own services run without HTTP (server/state.py's Services, built
as the single-process server builds them): one catalog of task states, one batcher that
forms batches across every front end and task, one engine pool. Each front end says hello
with its shared-memory arena; its Submits carry pixel references the workers read from
there. Uploads and deletes go through the service's catalog (it has the backbone to check
an artifact against), and every other front end is told to rescan. The engine's status is
pushed to every front end whenever it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time

from piggyback_serve.server.errors import ServeError
from piggyback_serve.server.protocol import (
    Answer,
    BackboneInfo,
    Cancel,
    Deleted,
    DeleteTask,
    EngineStatus,
    Hello,
    Refused,
    Reloaded,
    Restored,
    RestoreRegistry,
    Stored,
    StoreTask,
    Submit,
    TaskChanged,
    probs_to_bytes,
    read,
    write,
)
from piggyback_serve.server.state import Services

log = logging.getLogger(__name__)

STATUS_EVERY_S = 0.2  # how often the status is compared with the last one sent
RELOAD_WAIT_S = 5.0  # for every other front end to list an upload before it is answered


class _FrontEnd:
    """One connected front end: its writer, arena and requests in progress."""

    def __init__(self, hello: Hello, writer: asyncio.StreamWriter):
        self.pid, self.arena, self.writer = hello.pid, hello.arena, writer
        self.requests: dict[int, asyncio.Task] = {}
        self.sent: EngineStatus | None = None

    async def send(self, message) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await write(self.writer, message)


class ServiceSocket:
    def __init__(self, svc: Services, address: str):
        self.svc = svc
        self.address = address
        self.front_ends: set[_FrontEnd] = set()
        self._server: asyncio.AbstractServer | None = None
        self._pusher: asyncio.Task | None = None
        self._changes = itertools.count()
        self._reloads: dict[tuple[int, int], asyncio.Future] = {}  # (change, pid) -> ack

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.address)
        os.chmod(self.address, 0o600)
        self._pusher = asyncio.create_task(self._push_status(), name="piggy-status")

    async def close(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
        if self._server is not None:
            self._server.close()
        for front in list(self.front_ends):
            for task in front.requests.values():
                task.cancel()
            front.writer.close()

    # -- one front end ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if not isinstance(hello, Hello):
            log.error("engine service: a connection that did not say hello, closed")
            writer.close()
            return
        front = _FrontEnd(hello, writer)
        self.front_ends.add(front)
        log.info("front end pid %d connected", front.pid)
        await self._send_status(front)
        try:
            while True:
                message = await read(reader)
                if isinstance(message, Cancel):
                    if (task := front.requests.get(message.request_id)) is not None:
                        task.cancel()
                    continue
                if isinstance(message, Reloaded):
                    ack = self._reloads.get((message.change_id, front.pid))
                    if ack is not None and not ack.done():
                        ack.set_result(None)
                    continue
                task = asyncio.create_task(self._handle(front, message))
                front.requests[message.request_id] = task
                task.add_done_callback(lambda _, i=message.request_id: front.requests.pop(i, None))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.front_ends.discard(front)
            for (_, pid), ack in self._reloads.items():
                if pid == front.pid and not ack.done():
                    ack.set_result(None)  # gone: nothing to wait for
            for task in front.requests.values():
                task.cancel()
            self.svc.engine.drop_arena(front.arena)
            writer.close()
            log.info("front end pid %d disconnected", front.pid)

    async def _handle(self, front: _FrontEnd, message) -> None:
        try:
            match message:
                case Submit():
                    reply = await self._classify(message)
                case StoreTask(request_id, name, data):
                    task = await self.svc.require_catalog().put(name, data)
                    await self._changed(front, name)
                    reply = Stored(request_id, task.version)
                case DeleteTask(request_id, name):
                    removed = await self.svc.require_catalog().delete(name)
                    await self._changed(front, name, deleted=True)
                    reply = Deleted(request_id, removed)
                case RestoreRegistry(request_id):
                    restored, failed = await self.svc.require_catalog().restore()
                    for name in restored:
                        await self._changed(front, name)
                    reply = Restored(request_id, tuple(restored), failed)
                case _:
                    log.error("engine service: unknown message %r", type(message).__name__)
                    return
        except ServeError as exc:
            reason = getattr(exc, "reason", None)
            reply = Refused(
                message.request_id, exc.status, exc.code, exc.message, exc.headers, reason
            )
        except Exception as exc:  # a bug here must not end the connection
            log.exception("engine service: %s failed", type(message).__name__)
            reply = Refused(message.request_id, 500, "internal_error", f"{type(exc).__name__}")
        await front.send(reply)

    async def _classify(self, message: Submit) -> Answer:
        catalog = self.svc.require_catalog()
        task = catalog.tasks.get(message.task)
        if task is None:  # the front end listed it: new since the last rescan here
            await catalog.refresh()
            task = catalog.get(message.task)
        started = time.perf_counter()
        answered, probs = await self.svc.classify_pixels(
            task, list(message.rows), started, message.timeout_s
        )
        return Answer(message.request_id, tuple(map(probs_to_bytes, probs)), answered.version)

    async def _changed(self, origin: _FrontEnd, name: str, deleted: bool = False) -> None:
        """Every other front end lists an upload or delete before the origin answers it
        (each reads the task again and says so; one that does not in time is not waited
        for: its own rescan will find it)."""
        change_id = next(self._changes)
        others = [front for front in self.front_ends if front is not origin]
        loop = asyncio.get_running_loop()
        acks = {front.pid: loop.create_future() for front in others}
        for pid, ack in acks.items():
            self._reloads[(change_id, pid)] = ack
        try:
            for front in others:
                await front.send(TaskChanged(change_id, name, deleted))
            if acks:
                await asyncio.wait(acks.values(), timeout=RELOAD_WAIT_S)
        finally:
            for pid in acks:
                self._reloads.pop((change_id, pid), None)

    # -- status ------------------------------------------------------------------------------

    async def _push_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            for front in list(self.front_ends):
                await self._send_status(front)

    async def _send_status(self, front: _FrontEnd) -> None:
        status = self.status()
        if status != front.sent:
            front.sent = status
            await front.send(status)

    def status(self) -> EngineStatus:
        svc = self.svc
        engine, catalog = svc.engine, svc.catalog
        backbone = engine.backbone
        return EngineStatus(
            ready=svc.ready,
            startup_error=svc.startup_error,
            backbone=BackboneInfo(backbone.name, backbone.fingerprint) if backbone else None,
            device=str(engine.device),
            workers=tuple(engine.workers()),
            working_copy_bytes=engine.working_copy_bytes,
            device_state_bytes=engine.device_state_bytes,
            device_tier=engine.device_tier,
            host_tier=catalog.host.stats() if catalog else None,
            queue_depth=svc.batcher.depth(),
            failed=dict(catalog.failed) if catalog else {},
            held=len(catalog.held) if catalog else 0,
        )
