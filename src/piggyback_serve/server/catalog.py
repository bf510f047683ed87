"""The tasks this server knows: the registry's artifacts, parsed and validated once each.

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

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.errors import RegistryUnavailable, TaskNotFound
from piggyback_serve.server.registry import Entry, Registry, RegistryError

log = logging.getLogger("piggy.serve")


@dataclass(frozen=True)
class Task:
    """One servable task under the name the registry gives it: its artifact's metadata and
    head (the masks, once turned into `state`, are not kept) and its engine state."""

    name: str
    version: str
    size_bytes: int
    artifact: TaskArtifact
    state: TaskState

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


Prepare = Callable[[TaskArtifact], TaskState]


class Catalog:
    def __init__(
        self,
        registry: Registry,
        backbone: Backbone,
        prepare: Prepare,
        on_change: Callable[[str], None] = lambda name: None,
        rescan_s: float = 1.0,
    ):
        self.registry = registry
        self.backbone = backbone
        self.prepare = prepare  # artifact -> engine state (EnginePool.prepare)
        self.on_change = on_change  # called with a name whose artifact went away or changed
        self.tasks: dict[str, Task] = {}
        self.registry_error: str | None = None
        self._rejected: dict[str, str] = {}  # version -> why, so a bad file is parsed once
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
                for name in set(self.tasks) - set(entries):
                    self._forget(name)
                for name, entry in entries.items():
                    known = self.tasks.get(name)
                    if known is None or known.version != entry.version:
                        await self._load(entry)
                self.registry_error = None
            except RegistryError as exc:
                if self.registry_error is None:
                    log.error("registry unreachable: %s", exc)
                self.registry_error = str(exc)

    async def _load(self, entry: Entry) -> None:
        if entry.version in self._rejected:
            return
        found = await self.registry.read(entry.name)
        if found is None:
            self._forget(entry.name)
            return
        data, entry = found
        try:
            art, state = await asyncio.to_thread(self._parse, data)
        except ArtifactError as exc:
            log.warning("skipping task %s: invalid artifact: %s", entry.name, exc)
            self._rejected[entry.version] = str(exc)
            self._forget(entry.name)
            return
        self._remember(Task(entry.name, entry.version, entry.size, art, state))

    def _parse(self, data: bytes) -> tuple[TaskArtifact, TaskState]:
        """Validate, build the engine state, then drop the masks: the state replaces them."""
        art = parse(data, self.backbone)
        state = self.prepare(art)
        return dataclasses.replace(art, masks={}), state

    def _remember(self, task: Task) -> None:
        if task.name in self.tasks:
            self.on_change(task.name)
        self.tasks[task.name] = task
        log.info(
            "task %s: %d labels (version %s)", task.name, len(task.artifact.labels), task.version
        )

    def _forget(self, name: str) -> None:
        if self.tasks.pop(name, None) is not None:
            self.on_change(name)
            log.info("task %s removed", name)

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
        art, state = await asyncio.to_thread(self._parse, data)
        async with self._lock:
            try:
                entry = await self.registry.put(name, data)
            except RegistryError as exc:
                raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
            task = Task(name, entry.version, entry.size, art, state)
            self._remember(task)
            return task

    async def delete(self, name: str) -> bool:
        async with self._lock:
            try:
                removed = await self.registry.delete(name)
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


def _now() -> float:
    return asyncio.get_running_loop().time()
