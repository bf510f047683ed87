"""Where artifacts live: a small async interface and its backends, chosen by one URL."""

from __future__ import annotations

from server.registry.base import NAME_PATTERN, Entry, Registry, RegistryError, valid_name


def open_registry(url: str) -> Registry:
    """`dir:/path` (or a plain path) for a folder; `redis://...` once that backend exists."""
    if url.startswith(("redis://", "rediss://")):
        raise RegistryError(f"the redis registry backend is not available yet ({url})")
    from server.registry.dir import DirRegistry

    path = url.removeprefix("dir:")
    return DirRegistry(path)


__all__ = ["Entry", "NAME_PATTERN", "Registry", "RegistryError", "open_registry", "valid_name"]
