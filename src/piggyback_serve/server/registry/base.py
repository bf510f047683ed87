"""The registry contract: names to raw artifact bytes, each with a version tag."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import Protocol

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def valid_name(name: str) -> bool:
    """Task names become file names and keys: no separators, no dots, bounded length."""
    return bool(_NAME.fullmatch(name))


def header_size(prefix: bytes) -> int:
    """Bytes of a safetensors file's header, its 8-byte length included, from its first 8."""
    return 8 + int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else len(prefix)


class RegistryError(Exception):
    """The registry can't be reached or can't do what was asked."""


# What to do about each way a registry can refuse to store: said in the 507's message.
STORAGE_ADVICE = {
    "no_space": "free space on the disk that holds it",
    "quota": "free space there or raise the disk quota",
    "read_only": "mount it read-write",
    "permission": "let the server's user write to it (owner, mode)",
    "out_of_memory": "raise Redis maxmemory (CONFIG SET maxmemory) or free memory there",
}


# OSError numbers that say a folder can't take a write (not that it is unreachable): a 507.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "quota",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
}


class StorageError(RegistryError):
    """The registry is there but cannot store: out of space or memory, read-only, not
    permitted. Unlike an outage, waiting does not help: someone has to act (`advice`)."""

    def __init__(self, url: str, reason: str, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url, self.reason, self.detail = url, reason, detail

    @property
    def advice(self) -> str:
        return STORAGE_ADVICE.get(self.reason, "check the registry")


@dataclass(frozen=True)
class Entry:
    name: str
    version: str  # changes whenever the artifact behind the name changes
    size: int


class Registry(Protocol):
    """Raw artifact storage. Validation is the caller's job: it happens before `put`."""

    url: str

    async def ping(self) -> None:
        """Raise RegistryError when the backend can't be reached. The server calls it once
        as it starts (server/app.py): a backend may tidy up after a crash there (the folder
        backend sweeps its stale temp files)."""

    async def list(self) -> dict[str, Entry]:
        """Every stored task, by name."""

    async def read(self, name: str) -> tuple[bytes, Entry] | None:
        """The artifact's bytes and entry, or None when there is no such task."""

    async def read_header(self, name: str) -> tuple[bytes, Entry] | None:
        """The artifact's first bytes, its safetensors header whole (`header_size`), and
        its entry; or None. What listing a task needs, without reading its tensors."""

    async def put(self, name: str, data: bytes) -> Entry:
        """Store (or atomically replace) a task's artifact; StorageError when the backend
        refuses to (full, read-only...), with what was there before left as it was."""

    async def delete(self, name: str) -> bool:
        """Remove a task; False when it wasn't there; StorageError when it may not."""

    async def identity(self) -> str:
        """This registry's identity token, created at first use and kept in the registry
        itself (Redis: the key `{prefix}id`; a folder: its file `.piggy-registry-id`).
        Servers racing to create it agree on one. A registry that comes back empty (Redis
        restarted without its data, flushed, a new instance at the same address; a folder
        emptied or gone) has lost it, so the next call answers a new token: the catalog
        reads that as a reset, not as an order to delete every task (server/catalog.py).
        RegistryError when it can't be read."""

    async def close(self) -> None: ...

    # Optional: `async def wait_change(self, timeout_s: float) -> bool` waits up to
    # timeout_s for news of a change and says whether to list again (the Redis backend);
    # the catalog polls backends without it every PIGGY_REGISTRY_RESCAN_S.
