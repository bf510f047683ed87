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

A registry that comes back empty (Redis restarted without its data or flushed, a folder
emptied) is not an order to delete every task. Each registry has an identity token
(`Registry.identity`) that such a reset loses: a rescan that finds a new one *holds* the
tasks it knows but the registry lacks (serves them on, from the local artifact copy,
server/artifact_cache.py, when their state is not in memory) rather than forgetting them,
and /readyz says `degraded` until every held task is back in the registry (`restore`, or
an upload under its name) or deleted through this replica. With the same identity, a task
gone from the registry was deleted, and goes here too.
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
from piggyback_serve.server.artifact_cache import ArtifactCache
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

    async def restore(self) -> tuple[list[str], dict[str, str]]: ...


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
        cache: ArtifactCache | None = None,
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
        # Reset of the registry: its identity as of the last listing, and the tasks known
        # here that a reset took from it, served on until restored or deleted here.
        self.identity: str | None = None
        self.held: set[str] = set()
        self._reset_said = False
        self.cache = cache  # the local copy of artifacts (None: a front end, headers only)
        self._fill: asyncio.Task | None = None

    @property
    def registry_reset(self) -> bool:
        """A reset was detected and tasks are held (/readyz: degraded)."""
        return bool(self.held)

    async def refresh(self) -> None:
        """Bring the known tasks in line with the registry; keep serving if it is down."""
        async with self._lock:
            self._scanned_at = _now()
            try:
                # Listed before the identity is read: a reset between the two shows as a
                # new identity, never as an empty listing under the old one.
                entries = await self.registry.list()
                identity = await self.registry.identity()
                if self.identity is not None and identity != self.identity:
                    # Reset: list again, after the new identity exists, and hold what is gone.
                    entries = await self.registry.list()
                    self._hold(set(self.tasks) - set(entries), identity)
                self.identity = identity
                self.held -= set(entries)  # back in the registry: listed as usual below
                for name in (set(self.tasks) | set(self.failed)) - set(entries) - self.held:
                    self._forget(name)
                for name, entry in entries.items():
                    known = self.tasks.get(name)
                    if known is None or known.version != entry.version:
                        await self._load(entry)
                self._cleared()
                self.registry_error = None
            except (RegistryError, OSError) as exc:  # OSError: out of open files, say
                # A registry not read whole is not ready: /readyz says why until it is.
                message = explain(exc)
                if self.registry_error != message:
                    log.error("registry unreadable: %s", message)
                self.registry_error = message

    def _hold(self, names: set[str], identity: str) -> None:
        """A new identity: keep serving `names` (known here, gone there); say so once."""
        if not names:  # nothing here is missing there: nothing to keep, nothing to say
            log.info("registry %s has a new identity %s", self.registry.url, identity)
            return
        self.held |= names
        log.error(
            "registry %s was reset (its identity changed): %d tasks served here are not in "
            "it; they are held and served on (POST /registry/restore writes them back)",
            self.registry.url,
            len(self.held),
        )

    def _cleared(self) -> None:
        """Say so once, when the last held task is back or deleted."""
        if not self.held and self._reset_said:
            log.info("registry %s: reset cleared, no task held any more", self.registry.url)
        self._reset_said = bool(self.held)

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
        self.held.discard(task.name)
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
        self.held.discard(name)
        if self.cache is not None:
            self.cache.drop(name)

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
            data, entry = await self._read_whole(task)
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

    async def _read_whole(self, task: Task) -> tuple[bytes, Entry]:
        """The artifact's bytes: from the registry (a copy kept here too), or for a task
        held through a reset, from the local copy. A task the registry lacks is looked for
        once more (a rescan: a reset not seen yet holds it, a delete forgets it)."""
        try:
            found = await self.registry.read(task.name)
            if found is None and task.name not in self.held:
                await self.refresh()
                if task.name in self.held:
                    found = await self.registry.read(task.name)  # restored meanwhile?
        except RegistryError as exc:
            raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
        if found is not None:
            if self.cache is not None:
                await asyncio.to_thread(self.cache.put, task.name, found[1].version, found[0])
            return found
        if task.name not in self.held:
            self._forget(task.name)
            raise self.not_found(task.name)
        data = await self._copy_of(task)
        if data is None:
            raise RegistryUnavailable(
                f"task {task.name!r} is not in the registry (it was reset) and this replica "
                "has no copy of its artifact (PIGGY_ARTIFACT_CACHE_BYTES)"
            )
        return data, Entry(task.name, task.version, len(data))

    async def _copy_of(self, task: Task) -> bytes | None:
        if self.cache is None:
            return None
        return await asyncio.to_thread(self.cache.get, task.name, task.version)

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

    async def reload(self, name: str, deleted: bool = False) -> Task | None:
        """Read task `name` again from the registry now (its header): listed, replaced, or
        forgotten if it is gone, unless it is held through a reset and not `deleted` (a
        delete through another front end). For a front end told of a change by the engine
        service."""
        async with self._lock:
            try:
                found = await self.registry.read_header(name)
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            if found is None:
                if name not in self.held or deleted:
                    self._forget(name)
                    self._cleared()
                return self.tasks.get(name)
            known = self.tasks.get(name)
            self.held.discard(name)
            if known is None or known.version != found[1].version:
                self._list(*found)
            self._cleared()
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
                raise insufficient(exc, f"cannot store task {name!r}") from exc
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            task = Task(name, entry.version, entry.size, art)
            self._remember(task, state)  # replaces one held under that name
            self._cleared()
        if self.cache is not None:
            await asyncio.to_thread(self.cache.put, name, entry.version, data)
        return task

    async def delete(self, name: str) -> bool:
        if self.remote is not None:
            removed = await self.remote.delete(name)
            async with self._lock:
                self._forget(name)
                self._cleared()
            return removed
        async with self._lock:
            try:
                removed = await self.registry.delete(name)
            except StorageError as exc:
                raise insufficient(exc, f"cannot delete task {name!r}") from exc
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            removed = removed or name in self.held  # served here, though not there
            self._forget(name)
            self._cleared()
            return removed

    async def restore(self) -> tuple[list[str], dict[str, str]]:
        """Write every held task back into the registry (its bytes from the local copy),
        then rescan: the names written, and those that could not be (name -> why). A
        registry that refuses to store answers 507, one that is down 503."""
        if self.remote is not None:  # the engine service holds the copies
            restored, failed = await self.remote.restore()
            await self.refresh()
            return restored, failed
        restored, failed = [], {}
        async with self._lock:
            for name in sorted(self.held):
                task = self.tasks[name]
                data = await self._copy_of(task)
                if data is None:
                    failed[name] = "no local copy of its artifact (PIGGY_ARTIFACT_CACHE_BYTES)"
                    continue
                try:
                    parse_header(data, self.backbone)  # the copy is still whole
                    if await self.registry.read_header(name) is None:  # none uploaded since
                        await self.registry.put(name, data)
                        restored.append(name)
                except ArtifactError as exc:
                    failed[name] = f"local copy unreadable: {exc}"
                except StorageError as exc:
                    done = f" ({len(restored)} restored before)" if restored else ""
                    raise insufficient(exc, f"cannot restore task {name!r}{done}") from exc
                except RegistryError as exc:
                    raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
        if restored:
            log.info("registry %s: %d tasks restored", self.registry.url, len(restored))
        await self.refresh()
        return restored, failed

    async def watch(self) -> None:
        """Rescan forever (run as a background task): every `rescan_s`, or as soon as the
        registry announces a change when it can (Redis: pub/sub and a version counter).
        Beside it, the local artifact copy is filled (`_copy_listed`)."""
        if self.cache is not None and self.cache.budget > 0 and self._fill is None:
            self._fill = asyncio.create_task(self._copy_listed(), name="piggy-artifact-copies")
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

    async def _copy_listed(self) -> None:
        """Copy the artifacts of listed tasks that have no local copy yet, one registry read
        at a time (never a flood of reads), while the copy has room for them (filling never
        removes a copy); again every `rescan_s`."""
        while True:
            try:
                for task in list(self.tasks.values()):
                    cache = self.cache
                    if task.name in self.held or cache.has(task.name, task.version):
                        continue
                    if not cache.room_for(task.size_bytes):
                        continue
                    found = await self.registry.read(task.name)
                    # Still listed as this version (not replaced or deleted meanwhile)?
                    current = found is not None and found[1].version == task.version
                    if current and self.tasks.get(task.name) is task:
                        await asyncio.to_thread(cache.put, task.name, task.version, found[0])
            except RegistryError as exc:
                log.debug("artifact copies: %s", exc)
            except Exception:  # a bad pass must not end the filling
                log.exception("artifact copies failed")
            await asyncio.sleep(self.rescan_s)

    async def close(self) -> None:
        """Cancel a rescan a miss started and the copying (the app's lifespan ends)."""
        for task in (self._rescan, self._fill):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def insufficient(exc: StorageError, what: str) -> InsufficientStorage:
    """The 507: which registry, what failed, and what to do."""
    return InsufficientStorage(f"registry {exc.url} {what}: {exc.detail}; {exc.advice}", exc.reason)


def _now() -> float:
    return asyncio.get_running_loop().time()
