"""A registry that comes back empty is not an order to delete every task: the folder
registry's side (tests/redis/test_registry_reset.py runs two replicas on Redis), and the
local artifact copy's bound."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from piggyback_serve.server.artifact_cache import ArtifactCache
from piggyback_serve.server.registry.dir import ID_FILE, DirRegistry
from tests.server.server_support import TASKS, metric, png, serving, settings_for, until
from tests.server.test_e2e import piggy_serve

pytestmark = pytest.mark.anyio


async def predict(client, task: str, image: bytes):
    return await client.post(
        f"/predict?task={task}", content=image, headers={"content-type": "image/png"}
    )


def copies(home) -> set[str]:
    """Tasks with a local copy of their artifact in PIGGY_HOME/artifacts."""
    return {p.name.split(".")[0] for p in (home / "artifacts").glob("*.safetensors")}


async def test_an_emptied_folder_holds_every_task_until_restored(
    tmp_path, registry_dir, backbone, reference
):
    settings = settings_for(tmp_path, registry_dir, registry_rescan_s=0.1)
    image = png(21)
    async with serving(settings, backbone) as client:
        assert (await predict(client, "alpha", image)).status_code == 200  # a state in memory
        await until(lambda: copies(tmp_path) == set(TASKS), 10)  # the background fill
        assert (registry_dir / ID_FILE).exists()

        for item in registry_dir.iterdir():  # emptied, its identity file included
            item.unlink()
        catalog = client.app.state.services.catalog
        await until(lambda: len(catalog.held) == len(TASKS), 5)
        await asyncio.sleep(0.3)  # a few more rescans: still held, not forgotten

        listed = (await client.get("/tasks")).json()["tasks"]
        assert sorted(t["name"] for t in listed) == sorted(TASKS)
        for task in TASKS:  # beta, gamma, delta: never built, read from the local copy
            r = await predict(client, task, image)
            assert r.status_code == 200, r.text
            reference.check(task, image, r.json()["results"][0])
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "degraded" and body["held"] == len(TASKS)
        assert body["degraded"].startswith(f"registry reset: {len(TASKS)} tasks served here")
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_registry_reset") == 1
        assert metric(text, "piggy_tasks_held") == len(TASKS)

        r = await client.post("/registry/restore")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "restored": sorted(TASKS),
            "failed": {},
            "registry": f"dir:{registry_dir}",
        }
        assert {p.name for p in registry_dir.glob("*.safetensors")} == {
            f"{t}.safetensors" for t in TASKS
        }
        body = (await client.get("/readyz")).json()
        assert body["status"] == "ready" and body["held"] == 0 and body["degraded"] is None
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_registry_reset") == 0

        # The identity is the new one now: a file removed behind the server's back is a
        # delete again, obeyed within the rescan interval.
        os.unlink(registry_dir / "gamma.safetensors")
        await until(lambda: "gamma" not in catalog.tasks, 2)
        assert (await predict(client, "gamma", image)).status_code == 404
        assert not catalog.held


async def test_held_tasks_go_when_deleted_or_uploaded_here(
    tmp_path, registry_dir, backbone, task_files
):
    settings = settings_for(tmp_path, registry_dir, registry_rescan_s=0.1)
    async with serving(settings, backbone) as client:
        catalog = client.app.state.services.catalog
        for item in registry_dir.iterdir():
            item.unlink()
        await until(lambda: len(catalog.held) == len(TASKS), 5)
        # A delete through this replica of a task it holds: gone, and a 204.
        assert (await client.delete("/tasks/alpha")).status_code == 204
        assert "alpha" not in catalog.tasks and "alpha" not in copies(tmp_path)
        # An upload under a held name replaces the held task.
        data = task_files["gamma"].read_bytes()
        assert (await client.put("/tasks/beta", content=data)).status_code == 201
        assert catalog.held == {"gamma", "delta"}
        for name in ("gamma", "delta"):
            assert (await client.delete(f"/tasks/{name}")).status_code == 204
        assert not catalog.held
        body = (await client.get("/readyz")).json()
        assert body["status"] == "ready" and body["tasks"] == 1


async def test_a_reset_between_the_listing_and_the_identity_is_caught(
    tmp_path, registry_dir, backbone, monkeypatch
):
    settings = settings_for(tmp_path, registry_dir, registry_rescan_s=30)
    async with serving(settings, backbone) as client:
        catalog = client.app.state.services.catalog
        registry = catalog.registry
        listed = registry.list

        async def list_then_reset():
            found = await listed()
            for item in registry_dir.iterdir():  # emptied right after it was listed
                item.unlink()
            monkeypatch.setattr(registry, "list", listed)
            return found

        monkeypatch.setattr(registry, "list", list_then_reset)
        await catalog.refresh()  # the full listing, then a new identity
        await catalog.refresh()  # the empty listing under the new identity
        assert catalog.held == set(TASKS) and sorted(catalog.tasks) == sorted(TASKS)


async def test_without_a_copy_a_held_task_says_why(tmp_path, registry_dir, backbone):
    settings = settings_for(tmp_path, registry_dir, registry_rescan_s=0.1, artifact_cache_bytes=0)
    async with serving(settings, backbone) as client:
        catalog = client.app.state.services.catalog
        for item in registry_dir.iterdir():
            item.unlink()
        await until(lambda: len(catalog.held) == len(TASKS), 5)
        r = await predict(client, "beta", png(3))
        assert r.status_code == 503 and "no copy" in r.json()["error"]["message"]
        r = await client.post("/registry/restore")
        assert r.status_code == 200 and r.json()["restored"] == []
        assert sorted(r.json()["failed"]) == sorted(TASKS)


async def test_servers_racing_agree_on_a_folder_identity(tmp_path):
    folder = tmp_path / "tasks"
    registries = [DirRegistry(folder) for _ in range(4)]
    tokens = await asyncio.gather(*(r.identity() for r in registries * 3))
    assert len(set(tokens)) == 1 and len(tokens[0]) == 32
    assert [p.name for p in folder.iterdir()] == [ID_FILE]  # no temp file left
    assert await registries[0].list() == {}  # the file is not a task
    (folder / ID_FILE).unlink()
    assert await registries[1].identity() not in tokens


def test_the_artifact_copy_stays_within_its_budget_least_recently_used_first(tmp_path):
    folder = tmp_path / "artifacts"
    cache = ArtifactCache(folder, budget=250)
    cache.put("a", "v1", b"a" * 100)
    cache.put("b", "v1", b"b" * 100)
    assert cache.get("a", "v1") == b"a" * 100  # a used after b
    cache.put("c", "v1", b"c" * 100)  # 300 > 250: b, the least recently used, goes
    assert cache.get("b", "v1") is None and cache.has("a", "v1") and cache.has("c", "v1")
    assert cache.bytes == 200 and sum(p.stat().st_size for p in folder.iterdir()) == 200
    cache.put("a", "v2", b"A" * 50)  # a new version replaces the old one
    assert not cache.has("a", "v1") and cache.get("a", "v2") == b"A" * 50
    cache.put("huge", "v1", b"h" * 251)  # larger than the whole budget: not kept
    assert not cache.has("huge", "v1") and cache.bytes == 150
    assert not cache.room_for(101) and cache.room_for(100)
    # A restart finds what is there, within a smaller budget.
    again = ArtifactCache(folder, budget=120)
    assert again.bytes <= 120 and again.get("a", "v2") == b"A" * 50
    cache.drop("a")
    assert not (folder / "a.v2.safetensors").exists()

    # A folder that can't be written: nothing kept, and no write tried again for a while.
    (tmp_path / "file").write_bytes(b"")
    blocked = ArtifactCache(tmp_path / "file" / "artifacts", budget=250)
    blocked.put("a", "v1", b"a")
    assert not blocked.has("a", "v1") and not blocked.room_for(1)

    off = ArtifactCache(tmp_path / "off", budget=0)
    off.put("a", "v1", b"a")
    assert not off.has("a", "v1") and not (tmp_path / "off").exists()


@pytest.mark.slow
def test_front_ends_keep_serving_and_restore_through_the_engine_service(
    tmp_path, registry_dir, reference
):
    """`--frontends 2`: the engine service holds the copies and the states, each front
    end's own listing holds the tasks too, and /readyz of either says what the service does."""
    env = dict(
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_REGISTRY=f"dir:{registry_dir}",
        PIGGY_ENGINE_WORKERS="1",
        PIGGY_REGISTRY_RESCAN_S="0.2",
    )
    image = png(31)
    with piggy_serve(tmp_path, "--frontends", "2", **env) as client:
        url = str(client.base_url).rstrip("/")
        deadline = time.monotonic() + 20
        while copies(tmp_path / "home") != set(TASKS):  # the service's background fill
            assert time.monotonic() < deadline, copies(tmp_path / "home")
            time.sleep(0.1)
        for item in registry_dir.iterdir():
            item.unlink()

        def degraded() -> bool:
            body = httpx.get(f"{url}/readyz").json()  # either front end
            return body["status"] == "degraded" and body["held"] == len(TASKS)

        deadline = time.monotonic() + 10
        while not all(degraded() for _ in range(4)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(3):  # new connections: both front ends answer
            for task in TASKS:
                r = httpx.post(f"{url}/predict?task={task}", content=image)
                assert r.status_code == 200, r.text
                reference.check(task, image, r.json()["results"][0])
            listed = httpx.get(f"{url}/tasks").json()["tasks"]
            assert sorted(t["name"] for t in listed) == sorted(TASKS)
        assert metric(client.get("/metrics").text, "piggy_tasks_held") == len(TASKS)

        r = client.post("/registry/restore")
        assert r.status_code == 200 and r.json()["restored"] == sorted(TASKS), r.text
        assert sorted(p.name for p in registry_dir.glob("*.safetensors")) == sorted(
            f"{t}.safetensors" for t in TASKS
        )
        deadline = time.monotonic() + 5
        while not all(httpx.get(f"{url}/readyz").json()["status"] == "ready" for _ in range(4)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.delete("/tasks/beta").status_code == 204
        for _ in range(4):
            r = httpx.post(f"{url}/predict?task=beta", content=image)
            assert r.status_code == 404, r.text
