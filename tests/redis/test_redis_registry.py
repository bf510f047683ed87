"""The Redis backend alone, against a real redis-server of the test's own."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from piggyback_serve.server.registry import RegistryError, StorageError, open_registry
from piggyback_serve.server.registry.redis import RedisRegistry
from tests.server.server_support import metric, png, serving, settings_for

pytestmark = pytest.mark.anyio


async def test_put_list_read_replace_delete(redis_server):
    registry = open_registry(redis_server.url)
    assert isinstance(registry, RedisRegistry)
    try:
        await registry.ping()
        assert await registry.list() == {}
        first = await registry.put("t1", b"one")
        assert first.size == 3
        data, entry = await registry.read("t1")
        assert data == b"one" and entry == first
        second = await registry.put("t1", b"two!")
        assert second.version != first.version
        assert (await registry.list())["t1"] == second
        assert (await registry.read("t1"))[0] == b"two!"
        # The same bytes again are the same version: replicas have nothing to reload.
        assert (await registry.put("t1", b"two!")).version == second.version
        assert await registry.delete("t1") and not await registry.delete("t1")
        assert await registry.read("t1") is None and await registry.list() == {}
        with pytest.raises(RegistryError):
            await registry.put("../x", b"no")
    finally:
        await registry.close()


async def test_prefixes_keep_deployments_apart(redis_server):
    blue = open_registry(redis_server.url, redis_prefix="blue:")
    green = open_registry(redis_server.url, redis_prefix="green:")
    try:
        await blue.put("t", b"blue")
        assert await green.list() == {} and await green.read("t") is None
        await green.put("t", b"green")
        assert (await blue.read("t"))[0] == b"blue"
        await blue.delete("t")
        assert list(await green.list()) == ["t"]
    finally:
        await blue.close()
        await green.close()


async def test_a_write_is_all_or_nothing(redis_server):
    """Every key a put touches changes in one MULTI/EXEC: readers never see half a task,
    nor bytes of one version under the tag of another."""
    writer = open_registry(redis_server.url)
    reader = open_registry(redis_server.url)
    payloads = [bytes([i]) * (200_000 + i) for i in range(2)]
    versions = {hashlib.sha256(p).hexdigest()[:32]: p for p in payloads}
    done = asyncio.Event()

    async def write():
        for i in range(40):
            await writer.put("t", payloads[i % 2])
        done.set()

    async def read():
        seen = 0
        while not done.is_set():
            found = await reader.read("t")
            if found:
                data, entry = found
                assert versions[entry.version] == data and entry.size == len(data)
                seen += 1
            listing = await reader.list()
            assert set(listing) <= {"t"}
            assert all(versions[e.version] for e in listing.values())
            await asyncio.sleep(0)
        return seen

    try:
        _, seen = await asyncio.gather(write(), read())
        assert seen > 0
        assert redis_server.command("GET", "piggy:seq").split(b"\r\n")[1] == b"40"
    finally:
        await writer.close()
        await reader.close()


async def test_every_replica_hears_of_a_change_at_once(redis_server):
    writer = open_registry(redis_server.url)
    watcher = open_registry(redis_server.url)
    try:
        await watcher.list()
        assert await watcher.wait_change(1.0)  # the first subscription always resyncs
        await watcher.list()
        assert not await watcher.wait_change(0.1)  # nothing happened
        waiting = asyncio.create_task(watcher.wait_change(5.0))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await writer.put("t", b"x")
        assert await waiting
        assert time.monotonic() - started < 0.5
        assert list(await watcher.list()) == ["t"]
        waiting = asyncio.create_task(watcher.wait_change(5.0))
        await asyncio.sleep(0.05)
        await writer.delete("t")
        assert await waiting and await watcher.list() == {}
    finally:
        await writer.close()
        await watcher.close()


async def test_missed_notices_are_caught_by_the_version_counter(redis_server):
    """A change made while nobody listened (a notice lost) still shows: the counter moved."""
    watcher = open_registry(redis_server.url, redis_prefix="p:")
    try:
        await watcher.list()
        await watcher.wait_change(1.0)
        await watcher.list()
        # A write that publishes nothing, as if the notice had been lost in a disconnect.
        redis_server.command("INCR", "p:seq")
        assert await watcher.wait_change(0.1)
    finally:
        await watcher.close()


async def test_down_redis_fails_fast_and_comes_back(redis_server):
    registry = open_registry(redis_server.url, redis_timeout_s=0.5)
    try:
        await registry.put("t", b"x")
        redis_server.kill()
        started = time.monotonic()
        for call in (registry.ping(), registry.list(), registry.read("t"), registry.put("u", b"y")):
            with pytest.raises(RegistryError, match=str(redis_server.port)):
                await call
        assert await registry.wait_change(0.1)  # can't ask: the catalog must look (and fail)
        assert time.monotonic() - started < 5
        redis_server.start()  # same port, empty (no persistence here)
        await registry.ping()
        assert await registry.list() == {}
    finally:
        await registry.close()


def test_a_malformed_url_is_a_registry_error():
    with pytest.raises(RegistryError):
        open_registry("redis://host:notaport/0")


def _out_of_memory(redis_server) -> None:
    """Past 1 MB, writes are refused rather than keys evicted (Redis' OOM error)."""
    assert redis_server.command("CONFIG", "SET", "maxmemory", "1mb").startswith(b"+OK")
    policy = redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    assert policy.startswith(b"+OK")


async def test_redis_out_of_memory_is_a_storage_error(redis_server):
    registry = open_registry(redis_server.url)
    try:
        await registry.put("small", b"x")
        _out_of_memory(redis_server)
        with pytest.raises(StorageError) as caught:
            await registry.put("big", b"y" * (2 << 20))
        assert caught.value.reason == "out_of_memory" and caught.value.url == redis_server.url
        assert "maxmemory" in caught.value.advice
        # Reads still work (no transaction: Redis refuses those whole), and the write was
        # all or nothing.
        assert set(await registry.list()) == {"small"}
        assert (await registry.read("small"))[0] == b"x"
        redis_server.command("CONFIG", "SET", "maxmemory", "0")  # what the operator does
        await registry.put("big", b"y" * (2 << 20))
        assert set(await registry.list()) == {"small", "big"}
    finally:
        await registry.close()


async def test_redis_out_of_memory_answers_507(
    tmp_path, redis_server, redis_artifacts, redis_backbone
):
    settings = settings_for(tmp_path, tmp_path, admin_token="t0ken")
    settings = settings.model_copy(update={"registry": redis_server.url})
    auth = {"Authorization": "Bearer t0ken"}
    async with serving(settings, redis_backbone) as client:
        r = await client.put("/tasks/a", content=redis_artifacts["a"], headers=auth)
        assert r.status_code == 201, r.text
        _out_of_memory(redis_server)
        # Past 1 MB with `a` stored: Redis refuses the write (`b` is valid, 0.7 MB).
        r = await client.put("/tasks/a", content=redis_artifacts["b"], headers=auth)
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert redis_server.url in error["message"] and "maxmemory" in error["message"]
        r = await client.post("/predict?task=a", content=png(1))
        assert r.status_code == 200 and r.json()["results"][0]["top"][0]["label"].startswith("a-")
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_registry_write_errors_total", reason="out_of_memory") == 1
