"""A front end's side of the engine service: what the app calls instead of an in-process
engine when several front-end processes share one engine (PIGGY_FRONTENDS > 1).

It connects to the service's Unix socket (server/service_socket.py), writes each image's
pixels into this process's shared-memory arena and submits their references; answers,
errors, task uploads and the engine's status come back on the same connection
(server/protocol.py). If the service goes away the front end stops (SIGTERM to itself:
it drains what it can and exits; the supervisor is gone or replacing everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

import torch

from piggyback_serve.server.arena import Arena, ArenaFull, Row
from piggyback_serve.server.engine.tier import TierStats
from piggyback_serve.server.errors import NotReady, Overloaded, ServeError, Timeout, rebuilt
from piggyback_serve.server.protocol import (
    Answer,
    BackboneInfo,
    Cancel,
    Deleted,
    DeleteTask,
    EngineStatus,
    Hello,
    PixelRef,
    Refused,
    Reloaded,
    Restored,
    RestoreRegistry,
    Stored,
    StoreTask,
    Submit,
    TaskChanged,
    WorkerInfo,
    probs_from_bytes,
    read,
    write,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0


class EngineClient:
    """The engine service as the app sees it: the pool's and the batcher's read-outs
    (`ready`, `alive`, `workers()`, `depth()`...) from the status the service pushes, and
    `classify`, `store`, `delete` as requests over the socket."""

    def __init__(self, address: str):
        self.address = address
        self.arena = Arena()
        self.status: EngineStatus | None = None
        # The front end's catalog, read again for one task (Catalog.reload), set at start.
        self.reload: Callable[..., Awaitable[object]] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._listening: asyncio.Task | None = None
        self._status_changed = asyncio.Event()
        self._reloading: set[asyncio.Task] = set()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> BackboneInfo:
        """Connect, say hello, wait until the engine is ready; the backbone it serves."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.address)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no engine service at {self.address}") from None
                await asyncio.sleep(0.05)
        await write(self._writer, Hello(os.getpid(), self.arena.name))
        self._listening = asyncio.create_task(self._listen(), name="piggy-engine-client")
        while self.status is None or not (self.status.ready or self.status.startup_error):
            self._status_changed.clear()
            await self._status_changed.wait()
        if self.status.startup_error:
            raise RuntimeError(self.status.startup_error)
        return self.status.backbone

    async def close(self) -> None:
        self._closing = True
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._fail_pending(NotReady("the server is shutting down"))
        self.arena.close()

    # -- the batcher's and the pool's surface (read from the pushed status) -----------------

    def depth(self, name: str | None = None) -> int:
        return self.status.queue_depth if self.status else 0

    @property
    def backbone(self) -> BackboneInfo | None:
        return self.status.backbone if self.status else None

    @property
    def ready(self) -> bool:
        return self.status is not None and self.status.ready and self.alive > 0

    @property
    def alive(self) -> int:
        return sum(w.state == "ready" for w in self.workers())

    @property
    def device(self) -> str:
        return self.status.device if self.status else "?"

    def workers(self) -> list[WorkerInfo]:
        return list(self.status.workers) if self.status else []

    @property
    def working_copy_bytes(self) -> int:
        return self.status.working_copy_bytes if self.status else 0

    @property
    def device_state_bytes(self) -> int:
        return self.status.device_state_bytes if self.status else 0

    @property
    def device_tier(self) -> TierStats | None:
        return self.status.device_tier if self.status else None

    @property
    def host_tier(self) -> TierStats | None:
        return self.status.host_tier if self.status else None

    @property
    def failed(self) -> dict[str, str]:
        return self.status.failed if self.status else {}

    @property
    def held(self) -> int:
        """Tasks the service serves that a registry reset took from the registry."""
        return self.status.held if self.status else 0

    def forget(self, name: str) -> None:
        """The service forgets task states itself (it watches the registry too)."""

    # -- requests ----------------------------------------------------------------------------

    async def classify(self, task, images: list[Row], started: float, timeout_s: float):
        """Probabilities per image for `task` (the catalog's Task, header only), and the
        task that answered (a newer version when the service had one)."""
        try:
            with self.arena.holding(images) as refs:
                answer = await self._classify(task, refs, started, timeout_s)
        except ArenaFull as exc:
            raise Overloaded(f"too many images in flight: {exc}") from None
        probs = [torch.from_numpy(probs_from_bytes(p)) for p in answer.probs]
        if answer.version != task.version:  # the service runs a version not listed here
            name = task.name
            task = await self.reload(name) if self.reload else None
            if task is None or task.version != answer.version:
                raise NotReady(
                    f"task {name!r} changed while this request ran; retry", {"Retry-After": "1"}
                )
        return task, probs

    async def _classify(self, task, refs: list[PixelRef], started: float, timeout_s: float):
        remaining = max(timeout_s - (time.perf_counter() - started), 0.0)
        request_id = next(self._ids)
        message = Submit(request_id, task.name, task.version, tuple(refs), remaining)
        try:
            return await asyncio.wait_for(self._request(request_id, message), remaining)
        except TimeoutError:
            await self._send(Cancel(request_id))
            raise Timeout(f"no answer within {timeout_s:g}s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._send(Cancel(request_id))
            raise

    async def store(self, name: str, data: bytes) -> str:
        """PUT /tasks/{name} through the service: the stored artifact's version."""
        request_id = next(self._ids)
        stored = await self._request(request_id, StoreTask(request_id, name, data))
        return stored.version

    async def delete(self, name: str) -> bool:
        request_id = next(self._ids)
        deleted = await self._request(request_id, DeleteTask(request_id, name))
        return deleted.removed

    async def restore(self) -> tuple[list[str], dict[str, str]]:
        """POST /registry/restore through the service: names written back, and failures."""
        request_id = next(self._ids)
        done = await self._request(request_id, RestoreRegistry(request_id))
        return list(done.restored), dict(done.failed)

    async def _request(self, request_id: int, message) -> object:
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send(message)
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _send(self, message) -> None:
        if self._writer is None or self._writer.is_closing():
            raise NotReady("the engine service is not connected", {"Retry-After": "1"})
        await write(self._writer, message)

    # -- what the service sends --------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            while True:
                self._dispatch(await read(self._reader))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        if self._closing:
            return
        log.error("the engine service closed the connection: this front end stops")
        self._fail_pending(NotReady("the engine service is gone", {"Retry-After": "1"}))
        os.kill(os.getpid(), signal.SIGTERM)

    def _dispatch(self, message: object) -> None:
        match message:
            case EngineStatus():
                self.status = message
                self._status_changed.set()
            case TaskChanged(change_id, name, deleted):
                task = asyncio.create_task(self._reload(change_id, name, deleted))
                self._reloading.add(task)
                task.add_done_callback(self._reloading.discard)
            case (
                Answer(request_id) | Stored(request_id) | Deleted(request_id) | Restored(request_id)
            ):
                self._resolve(request_id, message, None)
            case Refused(request_id, status, code, text, headers, reason):
                self._resolve(request_id, None, rebuilt(status, code, text, headers, reason))

    async def _reload(self, change_id: int, name: str, deleted: bool = False) -> None:
        try:
            if self.reload is not None:
                await self.reload(name, deleted)
        except Exception:  # the registry is down: the catalog's watcher catches up later
            log.exception("task %s changed, and could not be read again", name)
        with contextlib.suppress(Exception):
            await self._send(Reloaded(change_id))

    def _resolve(self, request_id: int, result, error: ServeError | None) -> None:
        future = self._pending.get(request_id)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_pending(self, error: ServeError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
