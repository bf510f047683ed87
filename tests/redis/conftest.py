"""Fixtures for the Redis tests: a private redis-server per test, the small test backbone
and artifacts (shared helpers from tests/server/server_support.py)."""

from __future__ import annotations

import pytest

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import Backbone, load_backbone
from tests.redis.redis_support import RedisServer
from tests.server.server_support import BACKBONE, make_artifact


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_backbone() -> Backbone:
    return load_backbone(BACKBONE, "random")


@pytest.fixture(scope="session")
def redis_artifacts(tmp_path_factory, redis_backbone) -> dict[str, bytes]:
    """Three valid artifacts as bytes: `a` and `b` for one task name, `c` for another."""
    folder = tmp_path_factory.mktemp("redis-artifacts")
    out = {}
    for i, name in enumerate("abc"):
        art = make_artifact(redis_backbone, name, n_labels=3 + i, seed=100 + i)
        out[name] = artifacts.write(art, folder / f"{name}.safetensors").read_bytes()
    return out


@pytest.fixture
def anyio_backend():
    return "asyncio"
