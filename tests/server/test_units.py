"""The parts alone: folder registry, batcher scheduling, settings."""

import asyncio
import errno
import os
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from piggyback_serve.server.batcher import Batcher
from piggyback_serve.server.catalog import Task
from piggyback_serve.server.errors import Overloaded
from piggyback_serve.server.metrics import Metrics
from piggyback_serve.server.registry import RegistryError, StorageError, open_registry, valid_name
from piggyback_serve.server.registry import dir as dir_registry
from piggyback_serve.server.settings import Settings


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


@pytest.mark.anyio
async def test_dir_registry_fsyncs_the_file_then_the_folder(tmp_path, monkeypatch):
    registry = open_registry(f"dir:{tmp_path / 'reg'}")
    await registry.ping()
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd)) or real(fd))
    await registry.put("t1", b"one")
    # The temp file (a regular file) before its rename, then the folder after it.
    assert [stat.S_ISREG(s.st_mode) for s in synced] == [True, False]
    assert stat.S_ISDIR(synced[1].st_mode)
    assert await registry.delete("t1")
    assert len(synced) == 3 and stat.S_ISDIR(synced[2].st_mode)


@pytest.mark.anyio
async def test_dir_registry_sweeps_stale_temp_files_at_start(tmp_path):
    folder = tmp_path / "reg"
    folder.mkdir()
    host, old = dir_registry._host(), time.time() - dir_registry.STALE_S - 5
    dead = subprocess.Popen(["true"])
    dead.wait()
    files = {
        "crashed_long_ago": f".a.safetensors.{host}.1.abcd.tmp",  # by age
        "older_format": ".b.safetensors.x1y2z3.tmp",  # write_atomic's names, by age
        "dead_writer": f".c.safetensors.{host}.{dead.pid}.abcd.tmp",  # fresh, writer gone
        "this_process": f".d.safetensors.{host}.{os.getpid()}.abcd.tmp",  # none in flight
        "live_writer": f".e.safetensors.{host}.{os.getppid()}.abcd.tmp",  # kept
        "other_host": ".f.safetensors.elsewhere.1.abcd.tmp",  # fresh, kept
        "not_ours": ".notes.tmp",
        "task": "g.safetensors",
    }
    for kind, name in files.items():
        (folder / name).write_bytes(b"x")
        if kind in ("crashed_long_ago", "older_format"):
            os.utime(folder / name, (old, old))
    registry = open_registry(f"dir:{folder}")
    await registry.ping()
    kept = {files[k] for k in ("live_writer", "other_host", "not_ours", "task")}
    assert {p.name for p in folder.iterdir()} == kept
    # Listing does not sweep: only a server's start does.
    (folder / files["dead_writer"]).write_bytes(b"x")
    await registry.list()
    assert (folder / files["dead_writer"]).exists()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no_space"),
        (errno.EDQUOT, "quota"),
        (errno.EROFS, "read_only"),
        (errno.EACCES, "permission"),
        (errno.EPERM, "permission"),
    ],
)
async def test_dir_registry_says_it_cannot_store(tmp_path, monkeypatch, code, reason):
    registry = open_registry(f"dir:{tmp_path / 'reg'}")
    await registry.ping()
    await registry.put("t1", b"old")
    real_fsync = os.fsync

    def failing(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StorageError) as caught:
        await registry.put("t1", b"new, larger")
    assert caught.value.reason == reason and caught.value.url == registry.url
    # No temp file left, the old artifact whole.
    assert [p.name for p in (tmp_path / "reg").iterdir()] == ["t1.safetensors"]
    assert (await registry.read("t1"))[0] == b"old"
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: _raise(code))
    with pytest.raises(StorageError):
        await registry.delete("t1")


@pytest.mark.anyio
async def test_dir_registry_other_errors_stay_outages(tmp_path, monkeypatch):
    registry = open_registry(f"dir:{tmp_path / 'reg'}")
    await registry.ping()
    monkeypatch.setattr(os, "fsync", lambda fd: _raise(errno.EIO))
    with pytest.raises(RegistryError) as caught:
        await registry.put("t1", b"x")
    assert not isinstance(caught.value, StorageError)
    assert list((tmp_path / "reg").iterdir()) == []


def _raise(code: int):
    raise OSError(code, os.strerror(code))


class FakeEngine:
    """An engine pool of `workers` that record each batch as its rows' task names and
    answer each image with its own pixels (`submit`, as EnginePool's)."""

    def __init__(self, seconds: float = 0.01, workers: int = 1, first: tuple = ()):
        self.seconds = seconds
        self.durations = list(first)  # of the first batches, in order; then `seconds`
        self.workers = workers
        self.free = workers
        self.batches: list[list[str]] = []
        self.in_flight = self.most_in_flight = 0
        self.on_change = lambda: None

    @property
    def idle_workers(self) -> int:
        return self.free

    def submit(self, rows, pixels):
        assert self.free > 0, "the batcher submitted a batch while no worker was idle"
        self.free -= 1
        return asyncio.ensure_future(self._run(rows, pixels))

    async def _run(self, rows, pixels):
        self.batches.append([row.key[0] for row in rows])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.durations.pop(0) if self.durations else self.seconds)
            return [x.reshape(-1)[:2] for x in pixels]
        finally:
            self.in_flight -= 1
            self.free += 1
            self.on_change()


def task(name: str, version: str = "1", input_size: int = 32) -> Task:
    return Task(name, version, 0, artifact=None, state=SimpleNamespace(input_size=input_size))


@pytest.mark.anyio
async def test_batches_form_up_to_the_limit_and_keep_order():
    engine = FakeEngine()
    batcher = Batcher(engine, Metrics(), max_batch_size=4, max_delay_s=0.05, queue_size=100)
    batcher.start()
    try:
        xs = [torch.full((2,), float(i)) for i in range(10)]
        out = await asyncio.wait_for(batcher.submit(task("a"), xs), 5)
        assert [float(o[0]) for o in out] == list(range(10))
        assert engine.batches == [["a"] * 4, ["a"] * 4, ["a"] * 2]
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
        assert engine.batches == [["a"]]
        await asyncio.wait_for(batcher.submit(task("a"), [torch.zeros(2)]), 5)
        assert engine.batches == [["a"], ["a"]]
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_one_batch_mixes_tasks_oldest_image_first():
    engine = FakeEngine()
    batcher = Batcher(engine, Metrics(), max_batch_size=8, max_delay_s=0.05, queue_size=100)
    batcher.start()
    try:
        jobs = []
        for name in ("a", "b", "c", "d", "a", "b", "c", "d", "e"):
            jobs.append(asyncio.create_task(batcher.submit(task(name), [torch.zeros(2)])))
            await asyncio.sleep(0.001)  # distinct arrival times
        await asyncio.wait_for(asyncio.gather(*jobs), 5)
        # Full at 8 images from five queues: the 8 oldest go together, "e" waits its turn.
        assert engine.batches == [list("abcdabcd"), ["e"]]
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_images_of_another_shape_or_dtype_wait_for_their_own_batch():
    engine = FakeEngine()
    batcher = Batcher(engine, Metrics(), max_batch_size=8, max_delay_s=0.01, queue_size=100)
    batcher.start()
    small, large = torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8)
    try:
        jobs = [
            batcher.submit(task("small", input_size=4), [small] * 2),
            batcher.submit(task("large", input_size=8), [large] * 3),
            batcher.submit(task("more", input_size=4), [small]),
            batcher.submit(task("floats", input_size=4), [small.float()]),  # OIP's pixels
        ]
        await asyncio.wait_for(asyncio.gather(*jobs), 5)
        want = [["floats"], ["large"] * 3, ["small", "small", "more"]]
        assert sorted(engine.batches) == want
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_one_batch_runs_per_idle_worker_at_once():
    engine = FakeEngine(seconds=0.05, workers=2)
    batcher = Batcher(engine, Metrics(), max_batch_size=2, max_delay_s=0, queue_size=100)
    batcher.start()
    try:
        jobs = [batcher.submit(task(name), [torch.zeros(2)] * 2) for name in "abcdef"]
        await asyncio.wait_for(asyncio.gather(*jobs), 5)
        assert engine.most_in_flight == 2  # both workers busy, never a third batch
        assert sorted(map(tuple, engine.batches)) == [(n, n) for n in "abcdef"]
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_waiting_images_are_shared_among_idle_workers():
    engine = FakeEngine(seconds=0.05, workers=2)
    batcher = Batcher(engine, Metrics(), max_batch_size=8, max_delay_s=0.02, queue_size=100)
    batcher.start()
    try:
        await asyncio.wait_for(batcher.submit(task("a"), [torch.zeros(2)] * 8), 5)
        assert engine.batches == [["a"] * 4, ["a"] * 4]  # both workers, not one batch of 8
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_an_idle_worker_takes_waiting_images_while_another_is_busy():
    engine = FakeEngine(seconds=0.01, workers=2, first=(1.0, 0.05))
    batcher = Batcher(engine, Metrics(), max_batch_size=8, max_delay_s=0.05, queue_size=100)
    batcher.start()
    try:
        busy = asyncio.create_task(batcher.submit(task("a"), [torch.zeros(2)] * 8))
        await asyncio.sleep(0.2)  # 2 batches of 4: worker 1 busy for 1 s, worker 2 idle
        started = time.monotonic()
        await asyncio.wait_for(batcher.submit(task("b"), [torch.zeros(2)]), 5)
        # Not worker 1's end (1 s): worker 2 took it once it had waited max_delay.
        assert time.monotonic() - started < 0.5
        assert engine.batches[-1] == ["b"]
        await busy
    finally:
        await batcher.close()


@pytest.mark.anyio
async def test_per_task_queue_bound_holds_with_mixing():
    engine = FakeEngine(seconds=0.2)
    batcher = Batcher(engine, Metrics(), max_batch_size=2, max_delay_s=0, queue_size=3)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(task("a"), [torch.zeros(2)] * 2))
        await asyncio.sleep(0.05)  # taken by the engine: the queue is empty again
        waiting = asyncio.create_task(batcher.submit(task("a"), [torch.zeros(2)] * 3))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.submit(task("a"), [torch.zeros(2)])
        other = await asyncio.wait_for(batcher.submit(task("b"), [torch.zeros(2)]), 5)
        assert len(other) == 1  # another task's queue has its own bound
        await asyncio.wait_for(asyncio.gather(first, waiting), 5)
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
