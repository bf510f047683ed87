"""The parts alone: weight cache, folder registry, batcher scheduling, settings."""

import asyncio
import time

import pytest
import torch

from server.batcher import Batcher
from server.cache import WeightCache
from server.catalog import Task
from server.metrics import Metrics
from server.registry import open_registry, valid_name
from server.settings import Settings


def params(nbytes: int) -> dict:
    return {"w": torch.zeros(nbytes // 4)}


def test_cache_is_lru_bounded_in_bytes():
    cache = WeightCache(100)
    cache.put(("a", "1"), params(40), 40)
    cache.put(("b", "1"), params(40), 40)
    assert cache.get(("a", "1")) is not None  # a is now the most recent
    cache.put(("c", "1"), params(40), 40)
    assert cache.get(("b", "1")) is None and cache.evictions == 1
    assert cache.bytes == 80 and len(cache) == 2
    cache.put(("huge", "1"), params(400), 400)  # bigger than the budget: not kept
    assert cache.get(("huge", "1")) is None and cache.bytes == 80
    cache.drop("a")
    assert cache.get(("a", "1")) is None and cache.bytes == 40
    assert (cache.hits, cache.misses) == (1, 3)


@pytest.mark.parametrize("name", ["a", "flowers", "Task_2-b", "x" * 64])
def test_valid_names(name):
    assert valid_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a.b", "a/b", "-a", "_a", "x" * 65, "a b", "é"])
def test_invalid_names(name):
    assert not valid_name(name)


@pytest.mark.anyio
async def test_dir_registry_atomic_put_list_delete(tmp_path):
    registry = open_registry(f"dir:{tmp_path / 'reg'}")
    await registry.ping()
    first = await registry.put("t1", b"one")
    (tmp_path / "reg" / ".t2.safetensors.123.tmp").write_bytes(b"half written")
    (tmp_path / "reg" / "notes.txt").write_bytes(b"ignored")
    listing = await registry.list()
    assert list(listing) == ["t1"] and listing["t1"].size == 3
    second = await registry.put("t1", b"two!")
    assert second.version != first.version
    data, entry = await registry.read("t1")
    assert data == b"two!" and entry == second
    assert await registry.delete("t1") and not await registry.delete("t1")
    assert await registry.read("t1") is None


class FakeEngine:
    def __init__(self, seconds: float = 0.01):
        self.seconds = seconds
        self.batches: list[tuple[str, int]] = []

    async def predict(self, task, batch):
        self.batches.append((task.name, len(batch)))
        await asyncio.sleep(self.seconds)
        return batch.reshape(len(batch), -1)[:, :2]


def task(name: str, version: str = "1") -> Task:
    return Task(name, version, 0, artifact=None)


@pytest.mark.anyio
async def test_batches_form_up_to_the_limit_and_keep_order():
    engine = FakeEngine()
    batcher = Batcher(engine, Metrics(), max_batch_size=4, max_delay_s=0.05, queue_size=100)
    batcher.start()
    try:
        xs = [torch.full((2,), float(i)) for i in range(10)]
        out = await asyncio.wait_for(batcher.submit(task("a"), xs), 5)
        assert [float(o[0]) for o in out] == list(range(10))
        assert engine.batches == [("a", 4), ("a", 4), ("a", 2)]
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_a_hot_task_does_not_starve_a_cold_one():
    engine = FakeEngine(seconds=0.01)  # 4 images per 10 ms: slower than the hot stream
    batcher = Batcher(engine, Metrics(), max_batch_size=4, max_delay_s=0.002, queue_size=10_000)
    batcher.start()
    hot: list[asyncio.Task] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < 0.05:
            hot.append(asyncio.create_task(batcher.submit(task("hot"), [torch.zeros(2)])))
            await asyncio.sleep(0.001)
        cold_sent = time.monotonic()
        cold = asyncio.create_task(batcher.submit(task("cold"), [torch.zeros(2)]))
        while not cold.done() and time.monotonic() - started < 5:  # the hot stream goes on
            hot.append(asyncio.create_task(batcher.submit(task("hot"), [torch.zeros(2)])))
            await asyncio.sleep(0.001)
        assert cold.done(), "the cold task was starved"
        hot_backlog = sum(1 for h in hot if not h.done())
        assert hot_backlog > 0, "the test needs the hot task to be backlogged"
        assert time.monotonic() - cold_sent < 2.0
    finally:
        await batcher.close()
        await asyncio.gather(*hot, return_exceptions=True)


@pytest.mark.anyio
async def test_a_cancelled_request_is_dropped_from_its_queue():
    engine = FakeEngine(seconds=0.05)
    batcher = Batcher(engine, Metrics(), max_batch_size=1, max_delay_s=0, queue_size=10)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(task("a"), [torch.zeros(2)]))
        gone = asyncio.create_task(batcher.submit(task("a"), [torch.ones(2)]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await first
        assert engine.batches == [("a", 1)]
        await asyncio.wait_for(batcher.submit(task("a"), [torch.zeros(2)]), 5)
        assert engine.batches == [("a", 1), ("a", 1)]
    finally:
        await batcher.close()


def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PIGGY_HOME", str(tmp_path))
    monkeypatch.setenv("PIGGY_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PIGGY_ADMIN_TOKEN", "")
    settings = Settings()
    assert settings.max_batch_size == 7 and settings.admin_token is None
    assert settings.registry_url == f"dir:{tmp_path / 'tasks'}"
    assert Settings(demo=True).registry_url == f"dir:{tmp_path / 'demo' / 'tasks'}"
