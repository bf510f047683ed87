"""The tasks this server knows: the registry's artifacts, parsed and validated once each.

The registry may change under us (another process writing the folder, another replica),
so the catalog rescans it on a short interval and whenever a name is missed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
    ):
        self.registry = registry
        self.backbone = backbone
        self.prepare = prepare  # artifact -> engine state (EnginePool.prepare)
        self.on_change = on_change  # called with a name whose artifact went away or changed
        self.tasks: dict[str, Task] = {}
        self.registry_error: str | None = None
        self._rejected: dict[str, str] = {}  # version -> why, so a bad file is parsed once
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Bring the known tasks in line with the registry; keep serving if it is down."""
        async with self._lock:
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

    async def get(self, name: str) -> Task:
        """The task called `name`; looks at the registry again before saying 404."""
        task = self.tasks.get(name)
        if task is None:
            await self.refresh()
            task = self.tasks.get(name)
        if task is None and self.registry_error:
            # Can't tell whether it exists: say the registry is down, not that it's unknown.
            raise RegistryUnavailable(f"registry unavailable: {self.registry_error}")
        if task is None:
            raise self.not_found(name)
        return task

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

    async def watch(self, interval_s: float) -> None:
        """Rescan forever (run as a background task): every interval_s, or as soon as the
        registry announces a change when it can (Redis: pub/sub and a version counter)."""
        wait_change = getattr(self.registry, "wait_change", None)
        while True:
            try:
                if wait_change is None:
                    await asyncio.sleep(interval_s)  # a folder can't tell us: poll it
                elif not await wait_change(interval_s) and not self.registry_error:
                    continue
                await self.refresh()
            except Exception:  # a bad rescan must not end the watcher
                log.exception("registry rescan failed")
                await asyncio.sleep(interval_s)
