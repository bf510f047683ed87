"""A local copy of the artifacts this replica serves, on its own disk.

What a replica keeps serving, and writes back with POST /registry/restore, when its
registry comes back empty (server/catalog.py): the registry's bytes of every artifact read
whole here or stored through here, plus what the catalog's background fill copies. One file
per task version, `NAME.VERSION.safetensors` under `PIGGY_HOME/artifacts`, written
atomically; at most `PIGGY_ARTIFACT_CACHE_BYTES` in all, least recently used removed first
(0: no copy kept). Blocking file calls: the catalog runs them in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path

from piggyback_serve.masks.artifact import write_atomic
from piggyback_serve.server.registry import valid_name

log = logging.getLogger("piggy.serve")

SUFFIX = ".safetensors"
STALE_S = 600.0  # a temp file older than this is what a crash left
RETRY_S = 60.0  # after a write failed (disk full, read-only), no copy is tried for this long
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ArtifactCache:
    def __init__(self, folder: str | Path, budget: int):
        self.folder = Path(folder)
        self.budget = budget
        self._files: dict[Path, tuple[int, float]] = {}  # path -> (size, last used)
        self._lock = threading.RLock()  # calls come from the loop and worker threads
        self._failed_at = -RETRY_S  # monotonic time of the last write that failed
        if budget > 0:
            self._scan()

    @classmethod
    def for_settings(cls, settings) -> ArtifactCache:
        return cls(settings.home / "artifacts", settings.artifact_cache_bytes)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._files.values())

    def room_for(self, size: int) -> bool:
        """Whether `size` more bytes fit without removing anything (and writes work)."""
        return self._writable() and self.bytes + size <= self.budget

    def _writable(self) -> bool:
        return self.budget > 0 and time.monotonic() - self._failed_at >= RETRY_S

    def has(self, name: str, version: str) -> bool:
        return self._path(name, version) in self._files

    def get(self, name: str, version: str) -> bytes | None:
        """The copy of `name` at `version`, or None."""
        path = self._path(name, version)
        try:
            data = path.read_bytes()
        except OSError:
            with self._lock:
                self._files.pop(path, None)
            return None
        with self._lock:
            self._files[path] = (len(data), time.monotonic())
        with contextlib.suppress(OSError):  # the use order, for the next start's scan
            os.utime(path)
        return data

    def put(self, name: str, version: str, data: bytes) -> None:
        """Keep `data` as `name` at `version` (its other versions go), then remove the least
        recently used copies until the whole fits the budget. Never raises: a copy that
        can't be written is only not there."""
        if not self._writable() or len(data) > self.budget:
            return
        path = self._path(name, version)
        with self._lock:
            if self._files.get(path, (None,))[0] == len(data):  # kept already: now used
                self._files[path] = (len(data), time.monotonic())
                return
        try:
            write_atomic(path, data)
        except OSError as exc:  # said once a minute at most, as writes pause that long
            self._failed_at = time.monotonic()
            log.warning(
                "artifact copy of task %s not written to %s: %s; none tried for %gs",
                name,
                self.folder,
                exc,
                RETRY_S,
            )
            return
        with self._lock:
            self._files[path] = (len(data), time.monotonic())
        self.drop(name, keep=path)
        self._trim()

    def drop(self, name: str, keep: Path | None = None) -> None:
        """Remove every copy of `name` (but `keep`)."""
        with self._lock:
            gone = [p for p in self._files if _name_of(p) == name and p != keep]
            for path in gone:
                self._files.pop(path)
        for path in gone:
            path.unlink(missing_ok=True)

    def _trim(self) -> None:
        with self._lock:
            order = sorted(self._files, key=lambda p: self._files[p][1])
            total, gone = self.bytes, []
            while total > self.budget and order:
                path = order.pop(0)
                total -= self._files.pop(path)[0]
                gone.append(path)
        for path in gone:
            path.unlink(missing_ok=True)

    def _scan(self) -> None:
        """What an earlier run left, oldest use first (the files' mtimes), within budget."""
        try:
            items = [p for p in self.folder.iterdir() if p.name.endswith(SUFFIX)]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("artifact copies in %s not read: %s", self.folder, exc)
            return
        now, wall = time.monotonic(), time.time()
        for temp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if wall - temp.stat().st_mtime > STALE_S:
                    temp.unlink()
        for path in items:
            try:
                stat = path.stat()
            except OSError:
                continue
            if valid_name(_name_of(path)):
                self._files[path] = (stat.st_size, now - max(0.0, wall - stat.st_mtime))
        self._trim()

    def _path(self, name: str, version: str) -> Path:
        return self.folder / f"{name}.{_UNSAFE.sub('_', version)}{SUFFIX}"


def _name_of(path: Path) -> str:
    return path.name.split(".", 1)[0]
