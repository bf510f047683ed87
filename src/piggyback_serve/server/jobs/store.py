"""Where training jobs live: beside the tasks, in the registry, so that every replica
answers for every job whichever replica runs it.

- Folder registry: `<tasks folder>/jobs/<id>.json`, written atomically, and `<id>.cancel`
  when a cancel was asked for;
- Redis registry: the hash `{prefix}jobs` (id -> the job's JSON), the hash
  `{prefix}jobs:cancel`, and the channel `{prefix}jobs:events`, on which every write names
  the job it changed (what `wait` listens to; the folder is polled).

A job's record is written only by the replica that runs it (progress, result, heartbeat);
any replica may ask to cancel it, which is a separate flag, so that the two never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Protocol

from piggyback_serve.masks.artifact import write_atomic
from piggyback_serve.server.jobs.model import Job
from piggyback_serve.server.registry import REMOTE_SCHEMES, RegistryError, StorageError
from piggyback_serve.server.registry.base import STORAGE_ERRNOS

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
POLL_S = 0.25  # how often a folder is looked at again for a change
KEPT = 200  # finished jobs kept; older ones are dropped as new ones finish


def valid_id(job_id: str) -> bool:
    return bool(JOB_ID.fullmatch(job_id))


class JobStore(Protocol):
    url: str

    async def put(self, job: Job) -> None:
        """Create or replace the job's record; StorageError when it cannot be stored."""

    async def get(self, job_id: str) -> Job | None: ...

    async def list(self) -> list[Job]:
        """Every job kept, newest first."""

    async def ask_cancel(self, job_id: str) -> None: ...

    async def cancel_asked(self, job_id: str) -> bool: ...

    async def drop(self, job_id: str) -> None:
        """Forget a job: its record and its cancel flag."""

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Return when the job may have changed, or after `timeout_s`."""

    async def close(self) -> None: ...


def open_job_store(registry_url: str, prefix: str, timeout_s: float) -> JobStore:
    if registry_url.startswith(REMOTE_SCHEMES):
        return RedisJobStore(registry_url, prefix, timeout_s)
    return DirJobStore(Path(registry_url.removeprefix("dir:")).expanduser() / "jobs")


async def prune(store: JobStore) -> None:
    """Drop the oldest finished jobs past `KEPT`."""
    finished = [j for j in await store.list() if j.done]
    for job in finished[KEPT:]:
        await store.drop(job.id)


class DirJobStore:
    def __init__(self, folder: Path):
        self.folder = folder
        self.url = f"dir:{folder}"

    def _path(self, job_id: str, suffix: str) -> Path:
        if not valid_id(job_id):
            raise RegistryError(f"invalid job id {job_id!r}")
        return self.folder / f"{job_id}{suffix}"

    def _error(self, exc: OSError) -> RegistryError:
        reason = STORAGE_ERRNOS.get(exc.errno)
        if reason is not None:
            return StorageError(self.url, reason, str(exc))
        return RegistryError(f"{self.url}: {exc}")

    async def put(self, job: Job) -> None:
        def write():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(job.id, ".json"), job.model_dump_json().encode())

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise self._error(exc) from exc

    def _read(self, path: Path) -> Job | None:
        try:
            return Job.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:  # torn by hand or by another version: not a job we can show
            return None

    async def get(self, job_id: str) -> Job | None:
        if not valid_id(job_id):
            return None
        try:
            return await asyncio.to_thread(self._read, self._path(job_id, ".json"))
        except OSError as exc:
            raise self._error(exc) from exc

    async def list(self) -> list[Job]:
        def read_all():
            if not self.folder.is_dir():
                return []
            found = (self._read(p) for p in self.folder.glob("*.json") if valid_id(p.stem))
            return sorted((j for j in found if j), key=lambda j: j.created, reverse=True)

        try:
            return await asyncio.to_thread(read_all)
        except OSError as exc:
            raise self._error(exc) from exc

    async def ask_cancel(self, job_id: str) -> None:
        try:
            await asyncio.to_thread(self._path(job_id, ".cancel").touch)
        except OSError as exc:
            raise self._error(exc) from exc

    async def cancel_asked(self, job_id: str) -> bool:
        return await asyncio.to_thread(self._path(job_id, ".cancel").exists)

    async def drop(self, job_id: str) -> None:
        for suffix in (".json", ".cancel"):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self._path(job_id, suffix).unlink)

    async def wait(self, job_id: str, timeout_s: float) -> None:
        await asyncio.sleep(min(timeout_s, POLL_S))

    async def close(self) -> None:
        pass


class RedisJobStore:
    def __init__(self, url: str, prefix: str, timeout_s: float):
        import redis.asyncio as aioredis

        self.url = url
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.timeout_s = timeout_s
        self._jobs = f"{prefix}jobs"
        self._cancel = f"{prefix}jobs:cancel"
        self.channel = f"{prefix}jobs:events"
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task | None = None

    def _error(self, exc: Exception) -> RegistryError:
        from redis.exceptions import OutOfMemoryError

        if isinstance(exc, OutOfMemoryError):
            return StorageError(self.url, "out_of_memory", f"{type(exc).__name__}: {exc}")
        return RegistryError(f"{self.url}: {type(exc).__name__}: {exc}")

    async def _call(self, command):
        from redis.exceptions import RedisError

        try:
            return await command
        except RedisError as exc:
            raise self._error(exc) from exc

    async def put(self, job: Job) -> None:
        async def write():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._jobs, job.id, job.model_dump_json())
                pipe.publish(self.channel, job.id)
                await pipe.execute()

        await self._call(write())

    async def get(self, job_id: str) -> Job | None:
        if not valid_id(job_id):
            return None
        raw = await self._call(self._client.hget(self._jobs, job_id))
        return Job.model_validate_json(raw) if raw is not None else None

    async def list(self) -> list[Job]:
        raw = await self._call(self._client.hgetall(self._jobs))
        jobs = [Job.model_validate_json(v) for k, v in raw.items() if valid_id(k.decode())]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    async def ask_cancel(self, job_id: str) -> None:
        async def write():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._cancel, job_id, "1")
                pipe.publish(self.channel, job_id)
                await pipe.execute()

        await self._call(write())

    async def cancel_asked(self, job_id: str) -> bool:
        return bool(await self._call(self._client.hexists(self._cancel, job_id)))

    async def drop(self, job_id: str) -> None:
        async def write():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(self._jobs, job_id)
                pipe.hdel(self._cancel, job_id)
                await pipe.execute()

        await self._call(write())

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Until the channel names this job, or `timeout_s` (the caller reads the record
        again either way: a notice missed while disconnected costs one timeout)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="piggy-job-events")
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[job_id]

    async def _listen(self) -> None:
        from piggyback_serve.server.registry.redis import listen

        await listen(self._client, self.channel, self.timeout_s, self._heard)

    def _heard(self, job_id: bytes | None) -> None:
        """Wake who waits on that job; everyone when notices may have been missed."""
        if job_id is None:
            waiting = [e for events in self._waiters.values() for e in events]
        else:
            waiting = self._waiters.get(job_id.decode(), ())
        for event in waiting:
            event.set()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self._client.aclose()
