"""Fixtures for the Ray tests: one local Ray running `piggy-serve --ray --replicas 2` over a
private Redis, shared by the module (starting Ray is most of the time these tests take)."""

from __future__ import annotations

from pathlib import Path

import pytest

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from tests.ray.ray_support import TOKEN, RayServe
from tests.redis.redis_support import RedisServer
from tests.server.server_support import BACKBONE, Reference, make_artifact

HERE = Path(__file__).resolve().parent

TASKS = ("alpha", "beta")


@pytest.fixture(scope="module")
def task_blobs() -> dict[str, bytes]:
    backbone = load_backbone(BACKBONE, "random")
    return {
        name: artifacts.to_bytes(make_artifact(backbone, name, n_labels=4 + i, seed=70 + i))
        for i, name in enumerate(TASKS)
    }


@pytest.fixture(scope="module")
def reference(task_blobs) -> Reference:
    backbone = load_backbone(BACKBONE, "random")
    return Reference(
        backbone, {name: artifacts.load(blob, backbone) for name, blob in task_blobs.items()}
    )


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory):
    """Two CPU replicas, half a CPU each (this machine has 2 cores), sharing a Redis."""
    tmp = tmp_path_factory.mktemp("ray")
    redis = RedisServer(tmp / "redis")
    redis.start()
    env = {
        "PIGGY_HOME": str(tmp / "home"),
        "PIGGY_REGISTRY": redis.url,
        "PIGGY_BACKBONE": BACKBONE,
        "PIGGY_BACKBONE_WEIGHTS": "random",
        "PIGGY_ADMIN_TOKEN": TOKEN,
        "PIGGY_MAX_DELAY_MS": "2",
    }
    serve = RayServe(tmp / "piggy-ray.log", env, replicas=2, replica_cpus=0.5)
    try:
        serve.wait_ready()
        yield serve
    finally:
        serve.stop()
        redis.kill()
