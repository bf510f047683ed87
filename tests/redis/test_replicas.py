"""Two `piggy-serve` replicas sharing one Redis, started with exactly the environment
docker-compose.yml gives its replicas (only the listen address, the Redis URL and
PIGGY_HOME differ), so that these tests break when the compose file and the code disagree.

The tests run in file order on one cluster; the last one kills Redis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from tests.redis import compose_env
from tests.redis.compose_env import replica
from tests.redis.redis_support import RedisServer, eventually, free_port
from tests.redis.redis_support import replica as start_replica
from tests.server.server_support import Reference, png

TOKEN = "compose-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The compose file's own knobs, set as an operator would (a small backbone for speed).
COMPOSE_VARIABLES = {
    "PIGGY_ADMIN_TOKEN": TOKEN,
    "PIGGY_BACKBONE": "resnet18",
    "PIGGY_BACKBONE_WEIGHTS": "random",
}
PROPAGATION_S = 1.0
IMAGES = [png(700 + i) for i in range(2)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis (saving to a file, for the restart) and replicas A and B."""
    folder = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(folder / "redis", persist=True)
    redis.start()
    command, env = replica(COMPOSE_VARIABLES)
    # The venv's bin first: CI runs .venv/bin/python -m pytest without activating it.
    venv_bin = str(Path(sys.executable).parent)
    argv = [shutil.which(command[0], path=venv_bin) or command[0], *command[1:]]
    try:
        with (
            _replica(folder / "a", argv, env, redis) as a,
            _replica(folder / "b", argv, env, redis) as b,
        ):
            yield redis, a, b
    finally:
        redis.kill()


def _replica(folder: Path, argv, env, redis: RedisServer):
    port = free_port()
    folder.mkdir()
    own = dict(env, PIGGY_HOST="127.0.0.1", PIGGY_PORT=str(port), PIGGY_REGISTRY=redis.url)
    own["PIGGY_GRPC_PORT"] = "0"  # compose's 8001 is per container; here one host
    own["PIGGY_HOME"] = str(folder / "home")
    return start_replica(folder / "server.log", argv, own, port)


@pytest.fixture(scope="module")
def reference(redis_artifacts) -> Reference:
    own = load_backbone("resnet18", "random")
    return Reference(own, {k: artifacts.load(v, own) for k, v in redis_artifacts.items()})


def predict(client, task: str) -> list[dict] | None:
    files = [("file", (f"{i}.png", img, "image/png")) for i, img in enumerate(IMAGES)]
    r = client.post(f"/predict?task={task}&top_k=3", files=files)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return r.json()["results"]


def matches(reference: Reference, source: str, results: list[dict] | None) -> bool:
    if results is None:
        return False
    try:
        for image, result in zip(IMAGES, results, strict=True):
            reference.check(source, image, result, top_k=3)
    except AssertionError:
        return False
    return True


def knows(client, task: str, n_labels: int) -> bool:
    """The replica's catalog has this artifact (GET /tasks/NAME of a known name reads the
    catalog without a rescan). The first prediction after it also materialises W*mask,
    which takes a CPU-bound moment of its own, so the one-second bound is checked here."""
    r = client.get(f"/tasks/{task}")
    return r.status_code == 200 and len(r.json()["labels"]) == n_labels


def test_compose_environment_is_what_the_replicas_run(cluster):
    _, a, _ = cluster
    ready = a.get("/readyz").json()
    assert ready["backbone"] == "resnet18" and ready["registry"].startswith("redis://")
    assert a.put("/tasks/x", content=b"x").status_code == 401  # the admin token applies


def test_upload_on_a_is_served_by_b_within_a_second(cluster, redis_artifacts, reference):
    _, a, b = cluster
    assert predict(b, "shared") is None
    r = a.put("/tasks/shared", content=redis_artifacts["a"], headers=AUTH)
    assert r.status_code == 201, r.text
    # /tasks reads what B already knows (no rescan on a miss): only the notice can tell it.
    _, took = eventually(
        lambda: "shared" in [t["name"] for t in b.get("/tasks").json()["tasks"]], PROPAGATION_S
    )
    assert took < PROPAGATION_S
    on_b, on_a = predict(b, "shared"), predict(a, "shared")
    assert matches(reference, "a", on_b) and on_a == on_b


def test_replacing_a_task_reaches_both_replicas(cluster, redis_artifacts, reference):
    _, a, b = cluster
    assert matches(reference, "a", predict(b, "shared"))  # B has the old weights cached
    r = a.put("/tasks/shared", content=redis_artifacts["b"], headers=AUTH)
    assert r.status_code == 201, r.text
    eventually(lambda: knows(b, "shared", 4), PROPAGATION_S)  # artifact b: 4 labels
    assert matches(reference, "b", predict(b, "shared"))
    assert matches(reference, "b", predict(a, "shared"))


def test_delete_on_b_is_404_on_a_within_a_second(cluster):
    _, a, b = cluster
    assert predict(a, "shared") is not None
    assert b.delete("/tasks/shared", headers=AUTH).status_code == 204
    _, took = eventually(lambda: predict(a, "shared") is None, PROPAGATION_S)
    assert took < PROPAGATION_S
    assert b.get("/tasks/shared").status_code == 404


def test_demo_seed_uploads_once(cluster, redis_artifacts, tmp_path):
    """deploy/seed_demo.py, as the compose service `demo-seed` runs it."""
    _, a, b = cluster
    (tmp_path / "seeded.safetensors").write_bytes(redis_artifacts["c"])
    env = dict(os.environ, PIGGY_URL=str(a.base_url), PIGGY_TOKEN=TOKEN)
    seed = [sys.executable, str(compose_env.ROOT / "deploy" / "seed_demo.py"), str(tmp_path)]
    out = subprocess.run(seed, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "uploaded seeded" in out.stdout, out.stderr
    eventually(lambda: b.get("/tasks/seeded").status_code == 200, PROPAGATION_S)
    out = subprocess.run(seed, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "seeded already registered" in out.stdout, out.stderr
    assert b.delete("/tasks/seeded", headers=AUTH).status_code == 204


def test_a_job_on_a_is_followed_on_b_and_its_task_served_by_b(cluster):
    """A training job accepted by A: B lists it, follows it and serves its task."""
    from tests.server.test_jobs import CLASSES, FAST, colour_png, zipped

    _, a, b = cluster
    r = a.post("/tasks/learned/train", params=FAST, content=zipped(), headers=AUTH)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert b.get(f"/jobs/{job_id}").json()["task"] == "learned"
    with b.stream("GET", f"/jobs/{job_id}/events", timeout=120) as events:
        final = None
        for line in events.iter_lines():
            if line.startswith("data:"):
                final = line[5:]
    assert final is not None and '"state":"succeeded"' in final.replace(" ", ""), final
    red = colour_png(CLASSES["red"], seed=5)
    answer = b.post("/predict?task=learned", content=red, headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    assert [j["id"] for j in b.get("/jobs").json()["jobs"]] == [job_id]
    assert b.delete("/tasks/learned", headers=AUTH).status_code == 204


def test_redis_down_known_tasks_serve_and_recovery_is_automatic(
    cluster, redis_artifacts, reference
):
    redis, a, b = cluster
    assert a.put("/tasks/kept", content=redis_artifacts["c"], headers=AUTH).status_code == 201
    eventually(lambda: knows(b, "kept", 5), PROPAGATION_S)
    assert matches(reference, "c", predict(b, "kept"))
    assert redis.command("SAVE").startswith(b"+OK")
    redis.kill()

    for client in (a, b):
        assert matches(reference, "c", predict(client, "kept"))  # known tasks keep serving
        r = client.put("/tasks/new", content=redis_artifacts["a"], headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
        assert client.delete("/tasks/kept", headers=AUTH).status_code == 503

        def down(client=client):
            r = client.get("/readyz")
            return r.status_code == 503 and redis.url.split("/0")[0] in r.json()["error"]["message"]

        eventually(down, 5)
        assert client.post("/predict?task=nope", content=IMAGES[0]).status_code == 503
        assert matches(reference, "c", predict(client, "kept"))

    redis.start()  # same port, the saved data reloaded
    for client in (a, b):
        eventually(lambda client=client: client.get("/readyz").status_code == 200, 10)
    assert a.put("/tasks/after", content=redis_artifacts["a"], headers=AUTH).status_code == 201
    eventually(lambda: knows(b, "after", 3), PROPAGATION_S)
    assert matches(reference, "a", predict(b, "after"))
    assert matches(reference, "c", predict(b, "kept"))
    assert sorted(t["name"] for t in a.get("/tasks").json()["tasks"]) == ["after", "kept"]
