"""The Redis backend: artifacts in Redis, shared by every replica, changes announced at once.

Keys, under a prefix (default `piggy:`) so that deployments can share one Redis:

- `{prefix}task:{name}`: a hash with the artifact `data`, its `version` and `size`;
- `{prefix}index`: a hash name -> "version size", what `list` reads (no artifact bytes);
- `{prefix}seq`: a counter bumped by every put and delete;
- `{prefix}events`: the pub/sub channel every put and delete is announced on;
- `{prefix}id`: this registry's identity token, set once (SET NX) by the first server to
  ask: a Redis that lost its data has lost it too, which tells a reset from deletes.

A put or delete changes all four in one MULTI/EXEC, so a task is never half-present and
a reader never sees bytes from one version with the tag of another. Replicas listen on
the channel (a notice arrives within milliseconds) and also compare the counter with the
one their last listing saw: a replica that missed notices (disconnected, restarted
Redis) notices the difference and resyncs. Every command has a socket timeout, so a
Redis that is down or unreachable costs a request at most that long, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, RedisError

from piggyback_serve.server.registry.base import (
    Entry,
    RegistryError,
    StorageError,
    header_size,
    valid_name,
)

log = logging.getLogger("piggy.serve")

DEFAULT_PREFIX = "piggy:"
RESUBSCRIBE_S = 0.5  # wait between attempts to re-subscribe after losing the connection


def _version(data: bytes) -> str:
    # A content hash: a re-upload of the same bytes is no change, a different one always is.
    return hashlib.sha256(data).hexdigest()[:32]


def _seq(raw: bytes | None) -> int:
    return int(raw) if raw is not None else 0


class RedisRegistry:
    """Artifacts in Redis; `wait_change` tells the catalog when to look again."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0):
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry replaces a pooled connection a restarted Redis closed;
            # more would only stretch how long a request waits on a Redis that is down.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=max(1, int(timeout_s)),
        )
        self._index = f"{prefix}index"
        self._seq_key = f"{prefix}seq"
        self._id_key = f"{prefix}id"
        self.channel = f"{prefix}events"
        self._listed_seq: int | None = None  # the counter as of the last `list`
        self._changed = asyncio.Event()
        self._listener: asyncio.Task | None = None

    def _task_key(self, name: str) -> str:
        if not valid_name(name):  # the routes check first; this guards the key space
            raise RegistryError(f"invalid task name {name!r}")
        return f"{self.prefix}task:{name}"

    def _error(self, exc: Exception) -> RegistryError:
        if isinstance(exc, OutOfMemoryError):  # past maxmemory with noeviction: a 507
            return StorageError(self.url, "out_of_memory", f"{type(exc).__name__}: {exc}")
        return RegistryError(f"{self.url}: {type(exc).__name__}: {exc}")

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise self._error(exc) from exc

    async def list(self) -> dict[str, Entry]:
        # One round trip, but no MULTI: Redis past maxmemory refuses every command queued
        # in a transaction, reads too, and a listing must keep working then. The counter
        # is read first: a write landing between the two reads shows in the index under
        # the older count, which only costs one more listing (`wait_change`).
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                seq, index = await pipe.get(self._seq_key).hgetall(self._index).execute()
        except RedisError as exc:
            raise self._error(exc) from exc
        found = {}
        for raw_name, raw in index.items():
            name = raw_name.decode()
            version, _, size = raw.decode().partition(" ")
            if valid_name(name):
                found[name] = Entry(name, version, int(size))
        self._listed_seq = _seq(seq)
        return found

    async def identity(self) -> str:
        # SET NX then GET in one round trip, no MULTI (as `list`): past maxmemory Redis
        # refuses the SET, but the GET still reads a token that is there.
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._id_key, secrets.token_hex(16), nx=True).get(self._id_key)
                created, token = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise self._error(exc) from exc
        if isinstance(token, bytes):
            return token.decode()
        failure = created if isinstance(created, Exception) else token
        if isinstance(failure, Exception):
            raise self._error(failure) from failure
        raise RegistryError(f"{self.url}: no identity token at {self._id_key}")

    async def read(self, name: str) -> tuple[bytes, Entry] | None:
        key = self._task_key(name)
        try:
            data, version = await self._client.hmget(key, ["data", "version"])
        except RedisError as exc:
            raise self._error(exc) from exc
        if data is None or version is None:
            return None
        return data, Entry(name, version.decode(), len(data))

    async def read_header(self, name: str) -> tuple[bytes, Entry] | None:
        """The header stored beside the data (older entries have none: the data then)."""
        key = self._task_key(name)
        try:
            header, version, size = await self._client.hmget(key, ["header", "version", "size"])
        except RedisError as exc:
            raise self._error(exc) from exc
        if header is None or version is None or size is None:
            return await self.read(name)
        return header, Entry(name, version.decode(), int(size))

    async def put(self, name: str, data: bytes) -> Entry:
        entry = Entry(name, _version(data), len(data))
        key = self._task_key(name)
        note = json.dumps({"op": "put", "name": name, "version": entry.version})
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                fields = {"data": data, "header": data[: header_size(data)]}
                pipe.hset(key, mapping=fields | {"version": entry.version, "size": len(data)})
                pipe.hset(self._index, name, f"{entry.version} {entry.size}")
                pipe.incr(self._seq_key)
                pipe.publish(self.channel, note)
                await pipe.execute()
        except RedisError as exc:
            raise self._error(exc) from exc
        return entry

    async def delete(self, name: str) -> bool:
        key = self._task_key(name)
        note = json.dumps({"op": "delete", "name": name})
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hdel(self._index, name)
                pipe.incr(self._seq_key)
                pipe.publish(self.channel, note)
                _, removed, _, _ = await pipe.execute()
        except RedisError as exc:
            raise self._error(exc) from exc
        return bool(removed)

    async def wait_change(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for a notice; True when the catalog should list again.

        Also True when the counter moved since the last listing (missed notices) or Redis
        can't be asked (so that the catalog records the outage, and later the recovery).
        """
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="piggy-redis-events")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        if self._changed.is_set():
            self._changed.clear()
            return True
        try:
            seq = _seq(await self._client.get(self._seq_key))
        except RedisError:
            return True
        return seq != self._listed_seq

    async def _listen(self) -> None:
        await listen(self._client, self.channel, self.timeout_s, lambda _: self._changed.set())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self._client.aclose()


async def listen(
    client: aioredis.Redis, channel: str, timeout_s: float, heard: Callable[[bytes | None], None]
) -> None:
    """Hold a subscription to `channel` for ever, subscribing again whenever it drops:
    `heard` gets each message's data, and None whenever messages may have been missed (at
    every subscription: anything may have changed while nobody listened)."""
    while True:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            heard(None)
            while True:
                message = await pubsub.get_message(timeout=timeout_s)
                if message is not None:
                    heard(message["data"])
        except (RedisError, OSError) as exc:
            log.debug("redis %s: %s", channel, exc)
            heard(None)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        await asyncio.sleep(RESUBSCRIBE_S)
