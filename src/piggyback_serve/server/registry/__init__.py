"""Where artifacts live: a small async interface and its backends, chosen by one URL."""

from __future__ import annotations

from piggyback_serve.server.registry.base import (
    NAME_PATTERN,
    Entry,
    Registry,
    RegistryError,
    StorageError,
    valid_name,
)

# Backends over the network: an outage is expected to end, so the server waits it out.
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://")


def open_registry(url: str, redis_prefix: str = "piggy:", redis_timeout_s: float = 2.0) -> Registry:
    """`dir:/path` (or a plain path) for a folder; `redis://host:port/db` for Redis."""
    if url.startswith(REMOTE_SCHEMES):
        from piggyback_serve.server.registry.redis import RedisRegistry

        try:
            return RedisRegistry(url, redis_prefix, redis_timeout_s)
        except ValueError as exc:  # redis-py's verdict on a malformed URL
            raise RegistryError(f"bad registry URL {url!r}: {exc}") from exc
    from piggyback_serve.server.registry.dir import DirRegistry

    path = url.removeprefix("dir:")
    return DirRegistry(path)


__all__ = [
    "Entry",
    "NAME_PATTERN",
    "REMOTE_SCHEMES",
    "Registry",
    "RegistryError",
    "StorageError",
    "open_registry",
    "valid_name",
]
