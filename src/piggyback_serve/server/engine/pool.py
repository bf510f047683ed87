"""The engine pool: the workers (one process each) and what they share.

The pool loads the backbone once, folds it into a `Template` (server/engine/layout.py) in
shared memory and starts one worker process per placement (server/engine/placement.py)
from a fork server, so that a worker starts in a fraction of a second and maps the
pristine weights instead of copying them. Task states are built here once
(`prepare`), in shared memory too, and reach a worker with the first batch it runs of
that task, in the same message: a worker never meets a task it does not know. A removed
task is forgotten by every worker that holds it.

The batcher forms batches and hands each to `submit(rows, pixels) -> future`, which owns
the rest: it claims an idle worker (preferring the one whose working copy already runs the
batch's lead task; one batch runs per worker), releases it, and retries a failed mixed
batch task by task. Messages are typed (server/protocol.py); pixels are read by the worker
from shared memory (server/arena.py). A worker that dies (SIGKILL, out of memory) fails
only the batch it was running (`WorkerDied`) and is replaced; so does one silent on a
batch past its timeout (`batch_timeout_s`: stopped, deadlocked, stuck in a kernel), killed
first and shown as "hung" until it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable

import torch
import torch.multiprocessing

from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.backbones import Backbone, load_backbone
from piggyback_serve.server.arena import Arena
from piggyback_serve.server.engine import process, task_state
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.geometry import Geometries
from piggyback_serve.server.engine.layout import Template
from piggyback_serve.server.engine.placement import place
from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.engine.tier import TierStats
from piggyback_serve.server.engine.worker import Row
from piggyback_serve.server.protocol import (
    BatchDone,
    BatchFailed,
    DropArena,
    Forget,
    PixelRef,
    Ready,
    RunBatch,
    StartFailed,
    Stop,
    TaskKey,
    WorkerInfo,
    WorkerReport,
    probs_from_bytes,
)
from piggyback_serve.server.settings import Settings

log = logging.getLogger("piggy.serve")

START_TIMEOUT_S = 120.0
RESTART_DELAY_S = 1.0  # before replacing a worker that died while starting
# The automatic batch timeout (PIGGY_WORKER_TIMEOUT_S unset): this many times the slowest
# batch the pool has seen answered, and never under the floor.
AUTO_TIMEOUT_FACTOR = 20
AUTO_TIMEOUT_FLOOR_S = 30.0
SHARING_STRATEGY = "file_system"


class WorkerDied(RuntimeError):
    """The worker running a batch exited before answering it."""


class BatchError(RuntimeError):
    """The worker raised while running a batch (it goes on serving)."""


class Undecodable(ValueError):
    """A row's encoded image could not be decoded, on the device or the CPU (that row only)."""


class _Handle:
    """The pool's side of one worker process."""

    def __init__(self, config: WorkerConfig, process_, conn, restarts: int):
        self.config, self.process, self.conn, self.restarts = config, process_, conn, restarts
        self.state = "starting"
        self.error: str | None = None
        self.pid: int | None = None
        self.known: set[TaskKey] = set()
        self.pending: tuple[int, asyncio.Future] | None = None
        self.report = WorkerReport(0, 0, 0, None, 0)

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.pending is None

    def info(self) -> WorkerInfo:
        r = self.report
        return WorkerInfo(
            self.config.index,
            self.config.device,
            self.pid,
            self.state,
            self.pending is not None,
            r.batches,
            r.switches,
            r.mixed,
            self.restarts,
        )


class EnginePool:
    def __init__(self, settings: Settings, backbone: Backbone | None = None):
        self.settings = settings
        self.configs = place(settings)
        self.device = torch.device(self.configs[0].device)
        self.one_pass = self.configs[0].one_pass
        self.backbone = backbone
        self.template: Template | None = None
        self.geometries: Geometries | None = None
        self.on_change: Callable[[], None] = lambda: None  # a worker went idle, or changed
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._context = multiprocessing.get_context("forkserver")
        self._changed: asyncio.Event | None = None
        self._closing = False
        self._arena: Arena | None = None  # predict()'s own, made on first use
        self._slowest_s = 0.0  # the longest a batch has taken to be answered

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Backbone:
        """Load the backbone (once), fold it, start every worker and wait until they run."""
        self._changed = asyncio.Event()
        # Shared tensors by name, not by open file: with torch's default strategy every
        # shared tensor holds a descriptor in each process that has it (the template's
        # ~250 and one per task state), so a registry of thousands of tasks ran out of
        # them. Named segments are unlinked by torch's shm manager when the last user exits.
        torch.multiprocessing.set_sharing_strategy(SHARING_STRATEGY)
        await asyncio.to_thread(self._load)
        # The fork server (started with the first worker in this process) imports these
        # once, so that each worker forked from it starts without importing torch or the
        # model's library again.
        model_module = type(self.template.module).__module__
        self._context.set_forkserver_preload([process.__name__, model_module])
        for config in self.configs:
            self._spawn(config, restarts=0)
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(h.state == "starting" for h in self._handles.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine workers not ready within {START_TIMEOUT_S:g}s")
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        if not self.alive:
            errors = {h.error for h in self._handles.values()}
            raise RuntimeError(f"no engine worker started: {'; '.join(map(str, errors))}")
        return self.backbone

    def _load(self) -> None:
        if self.backbone is None:
            started = time.perf_counter()
            name, weights = self.settings.backbone, self.settings.backbone_weights
            self.backbone = load_backbone(name, weights)
            log.info("backbone %s loaded in %.1fs", name, time.perf_counter() - started)
        self.template = Template.of(self.backbone).share_memory()
        if self.one_pass:
            self.geometries = Geometries(self.template.module, self.template.layout.slots)

    def _spawn(self, config: WorkerConfig, restarts: int) -> None:
        ours, theirs = self._context.Pipe()
        worker = self._context.Process(
            target=process.main,
            args=(theirs, config, self.template),
            name=f"piggy-engine-{config.index}",
            daemon=True,
        )
        worker.start()
        theirs.close()
        handle = _Handle(config, worker, ours, restarts)
        self._handles[config.index] = handle
        # A thread per worker reads its answers: the pipe stays a blocking socket (an event
        # loop's reader, uvloop's, makes it non-blocking, and a large send then fails).
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._read, args=(handle, loop), name=f"piggy-pool-{config.index}", daemon=True
        ).start()

    async def close(self) -> None:
        self._closing = True
        for handle in self._handles.values():
            with contextlib.suppress(OSError):
                handle.conn.send(Stop())
        for handle in self._handles.values():
            await asyncio.to_thread(handle.process.join, 5)
            if handle.process.is_alive():
                handle.process.kill()
            handle.conn.close()
            handle.state = "stopped"
        if self._arena is not None:
            self._arena.close()

    # -- what the server reads -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.template is not None and self.alive > 0

    @property
    def idle_workers(self) -> int:
        return sum(h.idle for h in self._handles.values())

    @property
    def alive(self) -> int:
        return sum(h.state == "ready" for h in self._handles.values())

    def workers(self) -> list[WorkerInfo]:
        return [self._handles[i].info() for i in sorted(self._handles)]

    @property
    def working_copy_bytes(self) -> int:
        """The workers' working copies and the pristine buffer they share."""
        if self.template is None:
            return 0
        return self.template.base.nbytes * (1 + len(self._handles))

    @property
    def device_state_bytes(self) -> int:
        return sum(h.report.device_state_bytes for h in self._handles.values())

    @property
    def device_tier(self) -> TierStats | None:
        """The workers' device tiers summed (None where no worker copies states)."""
        tiers = [h.report.device_tier for h in self._handles.values()]
        tiers = [t for t in tiers if t is not None]
        return sum(tiers, TierStats()) if tiers else None

    # -- tasks ---------------------------------------------------------------------------

    def prepare(self, artifact: TaskArtifact) -> TaskState:
        """A validated artifact's task state, in shared memory. Thread-safe."""
        if self.template is None:
            raise RuntimeError("the engine has not started")
        geometries = self.geometries if self.one_pass else None  # tables for one pass only
        return task_state.build(artifact, self.template.layout, geometries).share_memory_()

    def forget(self, name: str) -> None:
        """Every worker drops the states of every version of task `name` (deleted or
        replaced). A batch already sent still runs with the state it was sent with."""
        for handle in self._handles.values():
            keys = [key for key in handle.known if key[0] == name]
            if keys and handle.state == "ready":
                handle.known.difference_update(keys)
                self._send(handle, Forget(tuple(keys)))

    def drop_arena(self, name: str) -> None:
        """Every worker unmaps arena `name` (its front end is gone)."""
        for handle in self._handles.values():
            if handle.state == "ready":
                self._send(handle, DropArena(name))

    # -- batches -------------------------------------------------------------------------

    def submit(self, rows: list[Row], pixels: list[PixelRef]) -> asyncio.Future:
        """Run one batch; a future of one result per row: its probabilities (numpy float32)
        or the exception that failed it (WorkerDied, BatchError).

        The pool owns the worker: it claims one (an idle worker at once where there is one,
        the one whose copy already runs the batch's lead task first), releases it when the
        answer comes, and retries a failed batch that mixes tasks one task at a time, so
        that only the rows of the task that fails (a bad task, a device fault) fail."""
        handle = self._claim(rows[0].key)
        return asyncio.ensure_future(self._run(rows, pixels, handle))

    async def predict(self, rows: list[Row], pixels: torch.Tensor) -> list[torch.Tensor]:
        """Rows given as one pixel tensor, through the pool's own arena: for callers without
        front ends (benchmarks, tests). Raises what failed the first failed row."""
        if self._arena is None:
            self._arena = Arena()
        refs = [self._arena.put(x) for x in pixels]
        try:
            results = await self.submit(rows, refs)
        finally:
            for ref in refs:
                self._arena.free(ref)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [torch.from_numpy(p) for p in results]

    async def _run(self, rows: list[Row], pixels: list[PixelRef], handle: _Handle | None):
        try:
            return await self._once(rows, pixels, handle)
        except BatchError as exc:
            if len({row.key for row in rows}) == 1:
                return [exc] * len(rows)
            log.warning("mixed batch failed (%s); running its tasks one by one", exc)
        results: list = [None] * len(rows)
        by_task: dict[TaskKey, list[int]] = {}
        for i, row in enumerate(rows):
            by_task.setdefault(row.key, []).append(i)
        for indices in by_task.values():
            try:
                piece = await self._once([rows[i] for i in indices], [pixels[i] for i in indices])
            except BatchError as exc:
                piece = [exc] * len(indices)
            for i, result in zip(indices, piece, strict=True):
                results[i] = result
        return results

    async def _once(self, rows, pixels, handle: _Handle | None = None) -> list:
        """One batch on one worker (`handle`, claimed, or the next to be idle). A worker
        that dies with it fails every row with WorkerDied: not the tasks' fault, no retry."""
        while handle is None:
            self._changed.clear()
            await self._changed.wait()
            handle = self._claim(rows[0].key)
        batch_id, future = handle.pending
        new = {row.key: row.state for row in rows if row.key not in handle.known}
        message = RunBatch(batch_id, tuple(r.key for r in rows), new, tuple(pixels))
        timeout_s = self.batch_timeout_s
        loop = asyncio.get_running_loop()
        watchdog = loop.call_later(timeout_s, self._hung, handle, batch_id, timeout_s)
        started = time.monotonic()
        try:
            self._send(handle, message)
            handle.known.update(new)
            try:
                results = await future
            except WorkerDied as exc:
                return [exc] * len(rows)
            self._slowest_s = max(self._slowest_s, time.monotonic() - started)
            return results
        finally:
            watchdog.cancel()
            self._release(handle, batch_id)

    @property
    def batch_timeout_s(self) -> float:
        """How long a worker may be silent on a batch before it is killed as hung.

        PIGGY_WORKER_TIMEOUT_S where set. Otherwise far past anything a batch has taken
        here (a loaded host or a new input shape can be several times slower than usual,
        and killing a slow but working worker costs more than waiting), with a floor that
        covers what the first batches cost before any is measured: a task's first patch,
        and with torch.compile a compile per input shape (the start timeout then)."""
        if self.settings.worker_timeout_s is not None:
            return self.settings.worker_timeout_s
        floor = START_TIMEOUT_S if self.settings.compile else AUTO_TIMEOUT_FLOOR_S
        return max(floor, AUTO_TIMEOUT_FACTOR * self._slowest_s)

    def _claim(self, lead: TaskKey) -> _Handle | None:
        """An idle worker for a batch led by task `lead` (the one whose copy runs it if
        any), now marked busy; None when every worker is busy."""
        idle = [h for h in self._handles.values() if h.idle]
        if not idle:
            return None
        handle = next((h for h in idle if h.report.patched == lead), idle[0])
        handle.pending = (next(self._ids), asyncio.get_running_loop().create_future())
        return handle

    def _release(self, handle: _Handle, batch_id: int) -> None:
        """The claimed worker is idle again (its batch `batch_id` answered or lost)."""
        if handle.pending is not None and handle.pending[0] == batch_id:
            handle.pending = None
            self._notify()

    def _send(self, handle: _Handle, message: tuple) -> None:
        try:
            handle.conn.send(message)
        except OSError:  # its end is gone: the reader sees the EOF and replaces it
            self._lost(handle)

    # -- messages from the workers -------------------------------------------------------

    def _read(self, handle: _Handle, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread of one worker: each answer goes to the loop, then the EOF."""
        try:
            while True:
                message = handle.conn.recv()
                loop.call_soon_threadsafe(self._dispatch, handle, message)
        except (EOFError, OSError):
            pass
        with contextlib.suppress(RuntimeError):  # the loop is gone: the pool closed with it
            loop.call_soon_threadsafe(self._lost, handle)

    def _dispatch(self, handle: _Handle, message: object) -> None:
        match message:
            case Ready(pid):
                handle.state, handle.pid = "ready", pid
                log.info("engine worker %d ready (pid %d)", handle.config.index, pid)
            case StartFailed(reason):
                handle.state, handle.error = "failed", reason
                log.error("engine worker %d failed to start: %s", handle.config.index, reason)
            case BatchDone(batch_id, probs, report) | BatchFailed(batch_id, probs, report):
                handle.report = report
                pending = handle.pending
                if pending is not None and pending[0] == batch_id and not pending[1].done():
                    if isinstance(message, BatchDone):
                        results = [probs_from_bytes(p) for p in probs]
                        for row, why in message.undecodable.items():
                            results[row] = Undecodable(why)
                        pending[1].set_result(results)
                    else:
                        pending[1].set_exception(BatchError(message.reason))
        self._notify()

    def _hung(self, handle: _Handle, batch_id: int, timeout_s: float) -> None:
        """Batch `batch_id` is unanswered past its timeout: fail it and kill the worker;
        its pipe's EOF then replaces it (`_lost`). Until the process is gone (a SIGKILL
        waits for a process stuck in the device driver) it shows as "hung"."""
        pending = handle.pending
        if pending is None or pending[0] != batch_id or pending[1].done():
            return
        index = handle.config.index
        log.error(
            "engine worker %d (pid %s) has not answered a batch in %gs; killing it",
            index,
            handle.pid,
            timeout_s,
        )
        handle.state = "hung"
        with contextlib.suppress(OSError):
            handle.process.kill()
        why = f"engine worker {index} did not answer within {timeout_s:g}s (killed, replaced)"
        pending[1].set_exception(WorkerDied(why))
        self._notify()

    def _lost(self, handle: _Handle) -> None:
        """The worker's pipe closed: fail its batch, replace it (unless closing)."""
        if self._handles.get(handle.config.index) is not handle or handle.state == "stopped":
            return
        loop = asyncio.get_running_loop()
        handle.conn.close()
        handle.process.join(0.1)
        code = handle.process.exitcode
        was = handle.state
        handle.state = "failed" if was == "failed" else "stopped"
        if handle.pending is not None and not handle.pending[1].done():
            handle.pending[1].set_exception(
                WorkerDied(f"engine worker {handle.config.index} exited (code {code})")
            )
        self._notify()
        if self._closing or was == "failed":  # one that cannot start is not retried
            return
        log.error(
            "engine worker %d (pid %s) exited with %s; replacing it",
            handle.config.index,
            handle.pid,
            code,
        )
        delay = 0.0 if was in ("ready", "hung") else RESTART_DELAY_S
        loop.call_later(delay, self._replace, handle)

    def _replace(self, handle: _Handle) -> None:
        if not self._closing and self._handles.get(handle.config.index) is handle:
            self._spawn(handle.config, restarts=handle.restarts + 1)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self.on_change()
