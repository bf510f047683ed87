"""The tasks this server knows: the registry's index and each artifact's header at start,
a task's state built on first use and kept in a bounded host-memory tier.

Listing a task reads its artifact's header only (name, labels, backbone, fingerprint,
size): start-up and memory do not grow with what the tasks hold. The first request to a
task reads the whole artifact, checks it against the backbone and builds the engine's
state (`resident`); states stay in host memory up to a budget in bytes, least recently
used evicted (every worker forgets it too) and read again on demand. An artifact found
invalid only then is reported (`failed`: /tasks' neighbours, /readyz, the log) and
answers 422 once, 404 with the reason after.

The registry may change under us (another process writing the folder, another replica),
so the catalog rescans it on a short interval (Redis: when a change is announced). A name
it does not know is answered from what it knows, never with a registry round trip: a miss
only asks for a rescan in the background, at most one per interval, so that random names
cannot keep the registry (or the lock uploads take) busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.engine.tier import Tier
from piggyback_serve.server.errors import (
    InsufficientStorage,
    InvalidArtifact,
    RegistryUnavailable,
    TaskNotFound,
)
from piggyback_serve.server.open_files import explain
from piggyback_serve.server.protocol import BackboneInfo
from piggyback_serve.server.registry import Entry, Registry, RegistryError, StorageError

log = logging.getLogger("piggy.serve")


@dataclass(frozen=True)
class Task:
    """One servable task under the name the registry gives it: its artifact's metadata
    (no tensors) and, on the copy `Catalog.resident` returns, its engine state."""

    name: str
    version: str
    size_bytes: int
    artifact: TaskArtifact  # read_header's: labels, input size, mean, std, metrics...
    state: TaskState | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def sparsity(self) -> float:
        """Fraction of masked weights switched off, as the artifact's metrics record it."""
        return self.artifact.metrics.get("sparsity", 0.0)


def parse(data: bytes, backbone: Backbone) -> TaskArtifact:
    """read + validate against the served backbone; raises ArtifactError naming the field."""
    return artifacts.load(data, backbone)


def parse_header(data: bytes, backbone: Backbone) -> TaskArtifact:
    """The header's metadata, checked, for this backbone (no tensor decoded)."""
    header = artifacts.read_header(data)
    artifacts.check_backbone(header, backbone)
    return header


Prepare = Callable[[TaskArtifact], TaskState]


class EngineService(Protocol):
    """What a front end's catalog asks of the engine service (server/engine_client.py)."""

    async def store(self, name: str, data: bytes) -> str: ...

    async def delete(self, name: str) -> bool: ...


class Catalog:
    def __init__(
        self,
        registry: Registry,
        backbone: Backbone | BackboneInfo,
        prepare: Prepare | None,
        on_change: Callable[[str], None] = lambda name: None,
        rescan_s: float = 1.0,
        host_budget: int = 1 << 62,
        loads: int = 2,
        remote: EngineService | None = None,
    ):
        self.registry = registry
        self.backbone = backbone
        self.prepare = prepare  # artifact -> engine state (EnginePool.prepare)
        # In a front end (PIGGY_FRONTENDS > 1), the engine service: it checks and stores
        # uploads against its backbone and holds the states; this catalog lists headers.
        self.remote = remote
        # Called with a name whose artifact went away or changed, or whose state was
        # evicted: the workers forget its states.
        self.on_change = on_change
        self.tasks: dict[str, Task] = {}  # every task listed, by name (headers only)
        self.host = Tier(host_budget)  # the states ready in host memory
        self.failed: dict[str, str] = {}  # name -> why its artifact could not be served
        self.registry_error: str | None = None
        self._rejected: dict[str, str] = {}  # version -> why, so a bad file is parsed once
        self._loading: dict[tuple[str, str], asyncio.Future] = {}  # one build per state
        self._loads = asyncio.Semaphore(loads)
        self.rescan_s = rescan_s  # PIGGY_REGISTRY_RESCAN_S: the shortest gap between rescans
        self._lock = asyncio.Lock()  # rescans, uploads and deletes, one at a time
        self._scanned_at = -math.inf  # loop time the last rescan was started or asked for
        self._rescan: asyncio.Task | None = None  # the rescan a miss asked for

    async def refresh(self) -> None:
        """Bring the known tasks in line with the registry; keep serving if it is down."""
        async with self._lock:
            self._scanned_at = _now()
            try:
                entries = await self.registry.list()
                for name in (set(self.tasks) | set(self.failed)) - set(entries):
                    self._forget(name)
                for name, entry in entries.items():
                    known = self.tasks.get(name)
                    if known is None or known.version != entry.version:
                        await self._load(entry)
                self.registry_error = None
            except (RegistryError, OSError) as exc:  # OSError: out of open files, say
                # A registry not read whole is not ready: /readyz says why until it is.
                message = explain(exc)
                if self.registry_error != message:
                    log.error("registry unreadable: %s", message)
                self.registry_error = message

    async def _load(self, entry: Entry) -> None:
        """List the task behind `entry` from its artifact's header."""
        if entry.version in self._rejected:
            return
        found = await self.registry.read_header(entry.name)
        if found is None:
            self._forget(entry.name)
            return
        self._list(*found)

    def _list(self, data: bytes, entry: Entry) -> None:
        try:
            header = parse_header(data, self.backbone)
        except ArtifactError as exc:
            self._reject(entry, exc)
            return
        self._remember(Task(entry.name, entry.version, entry.size, header))

    def _reject(self, entry: Entry, exc: ArtifactError) -> None:
        log.warning("task %s not served: invalid artifact: %s", entry.name, exc)
        self._rejected[entry.version] = str(exc)
        self._forget(entry.name)
        self.failed[entry.name] = f"invalid artifact: {exc}"

    def _build(self, data: bytes) -> tuple[TaskArtifact, TaskState]:
        """Validate, build the engine state; the artifact kept is its header's part."""
        art = parse(data, self.backbone)
        return art.header(), self.prepare(art)  # the state holds the tensors

    def _remember(self, task: Task, state: TaskState | None = None) -> None:
        if task.name in self.tasks:
            self._evict_all(task.name)
        self.tasks[task.name] = task
        self.failed.pop(task.name, None)
        if state is not None:
            self._keep(task.key, state)
        log.debug(
            "task %s: %d labels (version %s)", task.name, len(task.artifact.labels), task.version
        )

    def _forget(self, name: str) -> None:
        if self.tasks.pop(name, None) is not None:
            self._evict_all(name)
            log.info("task %s removed", name)
        self.failed.pop(name, None)

    def _evict_all(self, name: str) -> None:
        """Drop every state of `name` here and in the workers."""
        for key in [k for k in self.host.states if k[0] == name]:
            self.host.drop(key)
        self.on_change(name)

    def _keep(self, key: tuple[str, str], state: TaskState) -> None:
        for old in self.host.put(key, state):
            self.on_change(old[0])

    async def resident(self, task: Task) -> Task:
        """`task` with its engine state: from the host tier, or read from the registry,
        checked and built now (one build per state however many ask). An artifact found
        invalid now answers 422 and is reported; one gone since listing answers 404."""
        state = self.host.get(task.key)
        if state is not None:
            return dataclasses.replace(task, state=state)
        building = self._loading.get(task.key)
        if building is None:
            building = asyncio.ensure_future(self._build_state(task))
            self._loading[task.key] = building
            building.add_done_callback(lambda _: self._loading.pop(task.key, None))
        return await asyncio.shield(building)

    async def _build_state(self, task: Task) -> Task:
        async with self._loads:
            try:
                found = await self.registry.read(task.name)
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            if found is None:
                self._forget(task.name)
                raise self.not_found(task.name)
            data, entry = found
            try:
                art, state = await asyncio.to_thread(self._build, data)
            except ArtifactError as exc:
                self._reject(entry, exc)
                raise InvalidArtifact(f"task {task.name!r}: invalid artifact: {exc}") from exc
        current = Task(entry.name, entry.version, entry.size, art)
        if self.tasks.get(task.name, current).version != entry.version:
            self._remember(current)  # replaced since it was listed: serve the newer one
        elif task.name not in self.tasks:  # deleted while it was being built
            raise self.not_found(task.name)
        self._keep(current.key, state)
        return dataclasses.replace(current, state=state)

    def get(self, name: str) -> Task:
        """The task called `name`, from what the catalog knows: no registry round trip, no
        wait on the upload lock. A miss asks for a rescan (`rescan_soon`), then answers 404
        (503 while the registry is down: whether the task exists can't be told)."""
        task = self.tasks.get(name)
        if task is not None:
            return task
        self.rescan_soon()
        if self.registry_error:
            raise RegistryUnavailable(f"registry unavailable: {self.registry_error}")
        raise self.not_found(name)

    async def reload(self, name: str) -> Task | None:
        """Read task `name` again from the registry now (its header): listed, replaced, or
        forgotten if it is gone. For a front end told of a change by the engine service."""
        async with self._lock:
            try:
                found = await self.registry.read_header(name)
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            if found is None:
                self._forget(name)
                return None
            known = self.tasks.get(name)
            if known is None or known.version != found[1].version:
                self._list(*found)
            return self.tasks.get(name)

    def rescan_soon(self) -> None:
        """Rescan in the background unless a rescan started less than `rescan_s` ago (the
        watcher's included) or one is under way: a burst of misses costs one at most."""
        if self._rescan is not None and not self._rescan.done():
            return
        if _now() - self._scanned_at < self.rescan_s:
            return
        self._scanned_at = _now()
        self._rescan = asyncio.create_task(self._rescan_logged(), name="piggy-rescan")

    async def _rescan_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:  # nobody awaits this task: say what went wrong here
            log.exception("registry rescan failed")

    def not_found(self, name: str, shown: int = 10) -> TaskNotFound:
        """The 404 for `name`, saying which tasks there are and where to list them."""
        if name in self.failed:
            return TaskNotFound(f"task {name!r} is not served: {self.failed[name]}")
        names = sorted(self.tasks)
        if not names:
            return TaskNotFound(
                f"no task named {name!r}: no tasks are registered yet "
                "(upload one with PUT /tasks/{name})"
            )
        known = ", ".join(names[:shown])
        if len(names) > shown:
            known += f" and {len(names) - shown} more"
        return TaskNotFound(f"no task named {name!r}; known tasks: {known} (see GET /tasks)")

    async def put(self, name: str, data: bytes) -> Task:
        """Validate, then store: an invalid artifact never reaches the registry."""
        if self.remote is not None:  # the service validates, stores and builds
            await self.remote.store(name, data)
            task = await self.reload(name)
            if task is None:  # deleted again at once, through another front end
                raise self.not_found(name)
            return task
        art, state = await asyncio.to_thread(self._build, data)
        async with self._lock:
            try:
                entry = await self.registry.put(name, data)
            except StorageError as exc:  # what was stored before stays served
                raise _insufficient(exc, f"cannot store task {name!r}") from exc
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            task = Task(name, entry.version, entry.size, art)
            self._remember(task, state)
            return task

    async def delete(self, name: str) -> bool:
        if self.remote is not None:
            removed = await self.remote.delete(name)
            async with self._lock:
                self._forget(name)
            return removed
        async with self._lock:
            try:
                removed = await self.registry.delete(name)
            except StorageError as exc:
                raise _insufficient(exc, f"cannot delete task {name!r}") from exc
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            self._forget(name)
            return removed

    async def watch(self) -> None:
        """Rescan forever (run as a background task): every `rescan_s`, or as soon as the
        registry announces a change when it can (Redis: pub/sub and a version counter)."""
        wait_change = getattr(self.registry, "wait_change", None)
        while True:
            try:
                if wait_change is None:
                    # A folder can't tell us: poll it, `rescan_s` after the last rescan
                    # (one a miss asked for counts).
                    await asyncio.sleep(max(0.0, self._scanned_at + self.rescan_s - _now()))
                    if _now() - self._scanned_at < self.rescan_s:
                        continue
                elif not await wait_change(self.rescan_s) and not self.registry_error:
                    continue
                await self.refresh()
            except Exception:  # a bad rescan must not end the watcher
                log.exception("registry rescan failed")
                await asyncio.sleep(self.rescan_s)

    async def close(self) -> None:
        """Cancel a rescan a miss started (the app's lifespan ends)."""
        if self._rescan is not None:
            self._rescan.cancel()
            await asyncio.gather(self._rescan, return_exceptions=True)


def _insufficient(exc: StorageError, what: str) -> InsufficientStorage:
    """The 507: which registry, what failed, and what to do."""
    return InsufficientStorage(f"registry {exc.url} {what}: {exc.detail}; {exc.advice}", exc.reason)


def _now() -> float:
    return asyncio.get_running_loop().time()
