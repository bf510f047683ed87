"""The folder backend: one NAME.safetensors per task, written atomically.

A write goes to a temp file beside its destination, `.NAME.safetensors.HOST.PID.XXXX.tmp`,
which is fsynced, renamed over the destination, and the folder fsynced: readers see the old
file or the new one, never a torn one, and a crash leaves at most a temp file. Those are
swept when a server starts (`ping`).

The folder's identity token (`identity`) is the file `.piggy-registry-id` in it: a folder
emptied, or removed and made again, has a new one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from pathlib import Path

from piggyback_serve.masks.artifact import write_atomic
from piggyback_serve.server.registry.base import (
    STORAGE_ERRNOS,
    Entry,
    RegistryError,
    StorageError,
    header_size,
    valid_name,
)

log = logging.getLogger("piggy.serve")

SUFFIX = ".safetensors"
ID_FILE = ".piggy-registry-id"  # a dot first: never listed as a task
# A temp file no live writer could still be writing: the folder may be shared by servers on
# other hosts (whose processes we cannot see), and a write of the largest artifact takes
# seconds; an unfinished write also touches its file with every chunk.
STALE_S = 600.0
_TEMP = re.compile(r"^\.(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})\.safetensors\.(?P<rest>.+)\.tmp$")
_WRITER = re.compile(r"^(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[^.]+$")


def _entry(name: str, stat: os.stat_result) -> Entry:
    return Entry(name, f"{stat.st_mtime_ns:x}-{stat.st_size:x}-{stat.st_ino:x}", stat.st_size)


def _host() -> str:
    """This host's name as a temp-file token: no dots, so the name parses back."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class DirRegistry:
    """A folder that other processes may write to too; every call looks at the folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.url = f"dir:{self.path}"

    async def ping(self) -> None:
        await asyncio.to_thread(self._ping)
        await asyncio.to_thread(self.sweep)

    def _ping(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(exc) from exc
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise RegistryError(f"{self.url}: not readable")

    def sweep(self, now: float | None = None) -> int:
        """Remove the temp files crashed writes left; how many. Run as a server starts.

        A temp file goes when it is older than STALE_S, or when its name says it was
        written on this host by a process that is gone or is this one (nothing of ours is
        in flight as we start): a fresh temp file of another live server on this host, or
        of one on another host sharing the folder, is left to its writer."""
        now = time.time() if now is None else now
        host, removed = _host(), 0
        try:
            items = list(os.scandir(self.path))
        except OSError as exc:
            log.warning("registry %s: temp files not swept: %s", self.url, exc)
            return 0
        for item in items:
            found = _TEMP.match(item.name)
            if found is None or not item.is_file(follow_symlinks=False):
                continue
            writer = _WRITER.match(found["rest"])
            try:
                stale = now - item.stat(follow_symlinks=False).st_mtime > STALE_S
                if writer is not None and writer["host"] == host:
                    pid = int(writer["pid"])
                    stale = stale or pid == os.getpid() or not _alive(pid)
                if stale:
                    os.unlink(item.path)
                    removed += 1
            except FileNotFoundError:  # its writer renamed it, or another server swept it
                continue
            except OSError as exc:
                log.warning("registry %s: temp file %s not removed: %s", self.url, item.name, exc)
        if removed:
            log.info("registry %s: removed %d stale temp files", self.url, removed)
        return removed

    async def identity(self) -> str:
        return await asyncio.to_thread(self._identity)

    def _identity(self) -> str:
        """The token in ID_FILE, made now if there is none. The file appears whole (a temp
        file hard-linked to its name, which fails if another server linked first), so
        servers racing to make it agree on the first. A folder that can't take the file
        (read-only) is known by its device and inode instead."""
        file = self.path / ID_FILE
        try:
            return self._read_id(file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RegistryError(f"{self.url}: {exc}") from exc
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f"{ID_FILE}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(16))
                    f.flush()
                    os.fsync(f.fileno())
                # Another server may have linked first: its token holds.
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, file)
            finally:
                os.unlink(tmp)
            return self._read_id(file)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise RegistryError(f"{self.url}: {exc}") from exc
            try:
                stat = self.path.stat()
            except OSError as again:
                raise RegistryError(f"{self.url}: {again}") from again
            return f"folder:{stat.st_dev:x}:{stat.st_ino:x}"

    @staticmethod
    def _read_id(file: Path) -> str:
        return file.read_text(encoding="ascii", errors="replace").strip()

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
        dest = self._file(name)
        self._ping()
        try:
            self._write(dest, data)
            return _entry(name, dest.stat())
        except OSError as exc:
            raise self._error(exc) from exc

    def _write(self, dest: Path, data: bytes) -> None:
        """Temp file named by host and pid (the sweep reads them), fsync, rename, fsync the
        folder; the temp file goes on any failure."""
        write_atomic(dest, data, tag=f"{_host()}.{os.getpid()}.")
        self._fsync_dir()

    async def delete(self, name: str) -> bool:
        return await asyncio.to_thread(self._delete, name)

    def _delete(self, name: str) -> bool:
        file = self._file(name)
        try:
            file.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error(exc) from exc
        try:
            self._fsync_dir()
        except OSError as exc:
            raise self._error(exc) from exc
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

    def _error(self, exc: OSError) -> RegistryError:
        """StorageError when the folder refuses the write (full, read-only...), else a
        RegistryError (an outage: the folder's disk gone, say)."""
        reason = STORAGE_ERRNOS.get(exc.errno)
        detail = exc.strerror or str(exc)
        if reason is not None:
            return StorageError(self.url, reason, detail)
        return RegistryError(f"{self.url}: {exc}")
