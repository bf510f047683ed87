"""The folder backend: one NAME.safetensors per task, written atomically."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from piggyback_serve.masks.artifact import write_atomic
from piggyback_serve.server.registry.base import Entry, RegistryError, header_size, valid_name

SUFFIX = ".safetensors"


def _entry(name: str, stat: os.stat_result) -> Entry:
    return Entry(name, f"{stat.st_mtime_ns:x}-{stat.st_size:x}-{stat.st_ino:x}", stat.st_size)


class DirRegistry:
    """A folder that other processes may write to too; every call looks at the folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.url = f"dir:{self.path}"

    async def ping(self) -> None:
        await asyncio.to_thread(self._ping)

    def _ping(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"{self.url}: {exc}") from exc
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise RegistryError(f"{self.url}: not readable")

    async def list(self) -> dict[str, Entry]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> dict[str, Entry]:
        found = {}
        try:
            with os.scandir(self.path) as it:
                for item in it:
                    name = item.name.removesuffix(SUFFIX)
                    # Temp files start with a dot, so they never match a valid name.
                    if item.name.endswith(SUFFIX) and valid_name(name) and item.is_file():
                        found[name] = _entry(name, item.stat())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryError(f"{self.url}: {exc}") from exc
        return found

    async def read(self, name: str) -> tuple[bytes, Entry] | None:
        return await asyncio.to_thread(self._read, name)

    def _read(self, name: str) -> tuple[bytes, Entry] | None:
        try:
            with open(self._file(name), "rb") as f:
                stat = os.fstat(f.fileno())
                return f.read(), _entry(name, stat)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"{self.url}: {exc}") from exc

    async def read_header(self, name: str) -> tuple[bytes, Entry] | None:
        return await asyncio.to_thread(self._read_header, name)

    def _read_header(self, name: str) -> tuple[bytes, Entry] | None:
        try:
            with open(self._file(name), "rb") as f:
                stat = os.fstat(f.fileno())
                prefix = f.read(8)
                # A damaged file may claim any length: read no further than its end.
                rest = min(header_size(prefix), stat.st_size) - len(prefix)
                return prefix + f.read(max(rest, 0)), _entry(name, stat)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"{self.url}: {exc}") from exc

    async def put(self, name: str, data: bytes) -> Entry:
        return await asyncio.to_thread(self._put, name, data)

    def _put(self, name: str, data: bytes) -> Entry:
        self._ping()
        dest = write_atomic(self._file(name), data)
        self._fsync_dir()
        return _entry(name, dest.stat())

    async def delete(self, name: str) -> bool:
        return await asyncio.to_thread(self._delete, name)

    def _delete(self, name: str) -> bool:
        try:
            self._file(name).unlink()
        except FileNotFoundError:
            return False
        self._fsync_dir()
        return True

    async def close(self) -> None:
        return None

    def _file(self, name: str) -> Path:
        if not valid_name(name):  # the routes check first; this guards the filesystem
            raise RegistryError(f"invalid task name {name!r}")
        return self.path / f"{name}{SUFFIX}"

    def _fsync_dir(self) -> None:
        # The rename is durable only once the directory entry is on disk.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
