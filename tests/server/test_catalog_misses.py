"""server/catalog.py, on misses: an unknown task name is answered from what the server
knows; a miss costs the registry one rescan per PIGGY_REGISTRY_RESCAN_S at most."""

import asyncio
import shutil
import time

import pytest

from piggyback_serve.server import app as app_module
from piggyback_serve.server.registry.dir import DirRegistry
from tests.server.server_support import png, serving, settings_for, until

pytestmark = pytest.mark.anyio


def count_calls(registry, method: str) -> list[float]:
    """Record the time of each call of `registry.method` (the catalog holds this object)."""
    calls: list[float] = []
    real = getattr(registry, method)

    async def counted(*args, **kwargs):
        calls.append(time.monotonic())
        return await real(*args, **kwargs)

    setattr(registry, method, counted)
    return calls


async def test_a_burst_of_unknown_names_rescans_the_registry_once_at_most(
    tmp_path, registry_dir, backbone
):
    rescan_s = 2.0
    # No local artifact copies: their filling reads each task once, misses or not.
    settings = settings_for(
        tmp_path, registry_dir, registry_rescan_s=rescan_s, artifact_cache_bytes=0
    )
    async with serving(settings, backbone) as client:
        registry = client.app.state.services.registry
        lists = count_calls(registry, "list")
        reads = [count_calls(registry, m) for m in ("read", "read_header") if hasattr(registry, m)]
        started = time.monotonic()
        answers = await asyncio.gather(
            *(client.post(f"/predict?task=nope{i}", content=b"x") for i in range(100)),
            *(client.get(f"/tasks/nope{i}") for i in range(50)),
        )
        elapsed = time.monotonic() - started
        for r in answers:
            assert r.status_code == 404, r.text
            message = r.json()["error"]["message"]
            assert "known tasks: alpha, beta, delta, gamma" in message, message
        # One rescan per interval, whoever asks (the misses, or the folder's own poll).
        assert len(lists) <= 1 + int(elapsed / rescan_s), (len(lists), elapsed)
        assert not any(reads)  # nothing changed: no artifact is read again


class SilentRegistry(DirRegistry):
    """A registry that never announces a change (as a Redis written to behind the
    server's back): the watcher waits on it and never lists; only a miss can."""

    async def wait_change(self, timeout_s: float) -> bool:
        await asyncio.sleep(timeout_s)
        return False


async def test_a_task_written_behind_the_servers_back_is_served_after_the_rescan_interval(
    tmp_path, registry_dir, task_files, backbone, reference, monkeypatch
):
    rescan_s = 0.5
    monkeypatch.setattr(app_module, "open_registry", lambda url, *_: SilentRegistry(registry_dir))
    settings = settings_for(tmp_path, registry_dir, registry_rescan_s=rescan_s)
    image = png(21)
    async with serving(settings, backbone) as client:
        assert (await client.post("/predict?task=late", content=image)).status_code == 404
        shutil.copy(task_files["delta"], registry_dir / "late.safetensors")
        written = time.monotonic()
        while True:  # bounded: at most 10 intervals
            r = await client.post("/predict?task=late", content=image)
            if r.status_code == 200 or time.monotonic() - written > 10 * rescan_s:
                break
            assert r.status_code == 404, r.text
            await asyncio.sleep(0.05)
        assert r.status_code == 200, r.text
        reference.check("delta", image, r.json()["results"][0])


async def test_a_miss_never_waits_for_an_upload(settings, registry_dir, backbone):
    data = (registry_dir / "gamma.safetensors").read_bytes()
    async with serving(settings, backbone) as client:
        registry = client.app.state.services.registry
        entered, release = asyncio.Event(), asyncio.Event()
        real_put = registry.put

        async def held_put(name, blob):  # an upload stuck in the registry, lock held
            entered.set()
            await release.wait()
            return await real_put(name, blob)

        registry.put = held_put
        upload = asyncio.create_task(client.put("/tasks/uploading", content=data))
        try:
            await asyncio.wait_for(entered.wait(), 30)
            # Both answer while the upload holds the lock; the old code waited for it.
            r = await asyncio.wait_for(client.post("/predict?task=nope", content=b"x"), 5)
            assert r.status_code == 404
            r = await asyncio.wait_for(client.get("/tasks/nope"), 5)
            assert r.status_code == 404
        finally:
            release.set()
        assert (await upload).status_code == 201
        await until(lambda: (registry_dir / "uploading.safetensors").exists())
