"""Redis restarted empty at the same address (no persistence): two replicas that served two
tasks keep serving both, say `degraded`, and one `POST /registry/restore` puts the tasks
back for every replica; deletes are obeyed again afterwards."""

from __future__ import annotations

import asyncio

import pytest

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.server.registry import StorageError, open_registry
from tests.redis.redis_support import RedisServer, eventually, free_port, replica, serve_command
from tests.server.server_support import Reference, metric, png

TOKEN = "reset-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = png(811)


@pytest.fixture
def reference(redis_artifacts) -> Reference:
    own = load_backbone("resnet18", "random")
    return Reference(own, {k: artifacts.load(v, own) for k, v in redis_artifacts.items()})


def start(folder, redis: RedisServer):
    port = free_port()
    folder.mkdir()
    env = dict(
        PIGGY_HOST="127.0.0.1",
        PIGGY_PORT=str(port),
        PIGGY_GRPC_PORT="0",
        PIGGY_HOME=str(folder / "home"),
        PIGGY_REGISTRY=redis.url,
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_ENGINE_WORKERS="1",
        PIGGY_ADMIN_TOKEN=TOKEN,
    )
    return replica(folder / "server.log", serve_command(), env, port)


def copies(folder) -> set[str]:
    return {p.name.split(".")[0] for p in (folder / "home" / "artifacts").glob("*.safetensors")}


def answers(client, task: str, reference: Reference, source: str) -> bool:
    r = client.post(
        f"/predict?task={task}&top_k=3", content=IMAGE, headers={"content-type": "image/png"}
    )
    assert r.status_code == 200, r.text
    reference.check(source, IMAGE, r.json()["results"][0], top_k=3)
    return True


def test_an_empty_redis_is_no_mass_delete(tmp_path, redis_server, redis_artifacts, reference):
    with start(tmp_path / "a", redis_server) as a, start(tmp_path / "b", redis_server) as b:
        for name, source in (("one", "a"), ("two", "c")):
            r = a.put(f"/tasks/{name}", content=redis_artifacts[source], headers=AUTH)
            assert r.status_code == 201, r.text
        eventually(lambda: b.get("/readyz").json()["tasks"] == 2, 2)
        assert answers(b, "one", reference, "a")  # B builds one's state; two's never
        eventually(lambda: copies(tmp_path / "b") == {"one", "two"}, 10)  # B's fill

        redis_server.kill()
        redis_server.start()  # same port, no data: no tasks, no identity
        assert redis_server.command("DBSIZE").startswith(b":0")

        def degraded(client) -> dict:
            r = client.get("/readyz")
            body = r.json()
            assert r.status_code == 200 and body["status"] == "degraded", r.text
            return body

        for client in (a, b):
            body, _ = eventually(lambda client=client: degraded(client), 10)
            assert body["held"] == 2 and body["tasks"] == 2
            assert body["degraded"] == (
                "registry reset: 2 tasks served here are not in the registry "
                "(POST /registry/restore writes them back)"
            )
            text = client.get("/metrics").text
            assert metric(text, "piggy_registry_reset") == 1
            assert metric(text, "piggy_tasks_held") == 2
            assert answers(client, "one", reference, "a")
            assert answers(client, "two", reference, "c")  # on B: from its local copy

        assert b.post("/registry/restore").status_code == 401
        r = b.post("/registry/restore", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"restored": ["one", "two"], "failed": {}, "registry": redis_server.url}
        for client in (a, b):

            def ready(client=client) -> bool:
                body = client.get("/readyz").json()
                return body["status"] == "ready" and body["held"] == 0

            eventually(ready, 2)
            assert metric(client.get("/metrics").text, "piggy_registry_reset") == 0
            assert answers(client, "two", reference, "c")

        # Reset cleared: a deliberate delete through one replica reaches the other.
        assert a.delete("/tasks/one", headers=AUTH).status_code == 204
        _, took = eventually(lambda: b.get("/tasks/one").status_code == 404, 1.0)
        assert took < 1.0
        r = b.post("/predict?task=one", content=IMAGE, headers={"content-type": "image/png"})
        assert r.status_code == 404
        assert a.get("/readyz").json()["tasks"] == 1


@pytest.mark.anyio
async def test_the_identity_is_made_once_and_read_past_maxmemory(redis_server):
    registries = [open_registry(redis_server.url) for _ in range(3)]
    try:
        tokens = await asyncio.gather(*(r.identity() for r in registries * 2))
        assert len(set(tokens)) == 1 and len(tokens[0]) == 32
        assert redis_server.command("GET", "piggy:id") == f"$32\r\n{tokens[0]}\r\n".encode()
        # Every write refused (noeviction): the token that is there still reads.
        assert redis_server.command("CONFIG", "SET", "maxmemory", "1").startswith(b"+OK")
        redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        assert await registries[1].identity() == tokens[0]
        # Emptied and full: no token can be made, which is said, not guessed.
        assert redis_server.command("FLUSHALL").startswith(b"+OK")
        with pytest.raises(StorageError):
            await registries[2].identity()
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
        assert await registries[0].identity() not in tokens
    finally:
        for registry in registries:
            await registry.close()
