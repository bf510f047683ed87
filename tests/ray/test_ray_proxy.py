"""server/ray_proxy.py around stand-ins for Ray's proxy app (no Ray started), the metrics
bridge, and the pure parts of server/ray_app.py: the registry rule and the actor options."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from piggyback_serve.server.ray_app import (
    RayConfigError,
    actor_options,
    check_registry,
    max_replicas,
)
from piggyback_serve.server.ray_proxy import ProxyErrorsAsJson, middlewares

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def plain(status: int, text: bytes, content_type: bytes = b"text/plain", chunks: int = 1):
    """An inner app answering like Ray's proxy does by itself (text, maybe in chunks)."""

    async def app(scope, receive, send):
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        step = max(1, len(text) // chunks)
        parts = [text[i : i + step] for i in range(0, len(text), step)] or [b""]
        for i, part in enumerate(parts):
            await send(
                {"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1}
            )

    return app


async def silent(scope, receive, send):
    """Ray's proxy when the replica holding the request died: no answer at all."""


async def raising(scope, receive, send):
    raise RuntimeError("boom")


async def get(app, path: str = "/predict") -> httpx.Response:
    transport = httpx.ASGITransport(app=ProxyErrorsAsJson(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        return await client.get(path)


def error_of(r: httpx.Response) -> dict:
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


async def test_a_lost_replica_is_a_json_503_with_retry_after():
    for app in (silent, raising):
        r = await get(app)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert error_of(r)["code"] == "replica_lost"


@pytest.mark.parametrize(
    ("ray_status", "status", "code"),
    [
        (408, 504, "timeout"),
        (503, 503, "unavailable"),
        (404, 404, "not_found"),
        (418, 418, "proxy_error"),
    ],
)
async def test_rays_own_errors_take_our_shape(ray_status, status, code):
    text = b"Request abc timed out after 35.0s."
    r = await get(plain(ray_status, text, chunks=3))
    assert r.status_code == status
    error = error_of(r)
    assert error["code"] == code and error["message"] == text.decode()
    assert ("retry-after" in r.headers) == (status == 503)


async def test_replica_answers_pass_unchanged():
    ours = json.dumps({"error": {"code": "task_not_found", "message": "no task x"}}).encode()
    r = await get(plain(404, ours, b"application/json"))
    assert r.status_code == 404 and r.content == ours
    r = await get(plain(200, b"ok"))
    assert r.status_code == 200 and r.text == "ok"


def test_the_callback_gives_ray_a_starlette_middleware():
    assert [m.cls for m in middlewares()] == [ProxyErrorsAsJson]


def test_a_folder_registry_needs_one_replica_or_a_shared_path():
    check_registry("dir:/data/tasks", 1, shared=False)
    check_registry("redis://127.0.0.1:6379/0", 8, shared=False)
    check_registry("dir:/mnt/nfs/tasks", 8, shared=True)
    with pytest.raises(RayConfigError, match="folder registry.*shared_registry"):
        check_registry("dir:/data/tasks", 2, shared=False)


def test_max_replicas_reads_autoscaling_first():
    fixed = SimpleNamespace(autoscaling_config=None, num_replicas=3)
    scaling = SimpleNamespace(autoscaling_config=SimpleNamespace(max_replicas=5), num_replicas=1)
    assert (max_replicas(fixed), max_replicas(scaling)) == (3, 5)


def test_one_gpu_per_replica_where_there_are_gpus():
    assert actor_options(0.5, 0) == {"num_cpus": 0.5}
    assert actor_options(1, 4) == {"num_cpus": 1, "num_gpus": 1}


def test_our_metrics_reach_rays_gauges_per_replica(monkeypatch):
    from prometheus_client import CollectorRegistry, Counter

    from piggyback_serve.server import ray_metrics

    made = {}

    class FakeGauge:
        def __init__(self, name, description, tag_keys):
            self.tag_keys, self.values = tag_keys, {}
            made[name] = self

        def set(self, value, tags):
            assert set(tags) == set(self.tag_keys)
            self.values[tuple(sorted(tags.items()))] = value

    monkeypatch.setattr(ray_metrics, "Gauge", FakeGauge)
    registry = CollectorRegistry()
    requests = Counter("piggy_requests", "HTTP requests", ["route"], registry=registry)
    requests.labels("/predict").inc(3)
    bridge = ray_metrics.RayMetricsBridge(registry)
    bridge.export()
    requests.labels("/predict").inc()
    bridge.export()  # the same gauge, its new value
    gauge = made["piggy_requests_total"]
    assert gauge.tag_keys == ("route", "replica")
    key = (("replica", ray_metrics.replica_id()), ("route", "/predict"))
    assert gauge.values == {key: 4.0}
