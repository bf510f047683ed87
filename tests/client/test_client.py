"""Client and AsyncClient against a real server: typed results, every image input kind,
task admin with the token, and the server's errors as exceptions."""

from __future__ import annotations

import asyncio
import io
import socket

import pytest
from PIL import Image

from piggyback_serve.client import AsyncClient, Client, Prediction, TaskInfo, TransportError
from piggyback_serve.client.errors import AuthError, BadRequest, NotAnImage, NotFound
from tests.client.live_server import TOKEN, png


@pytest.fixture
def client(live):
    with Client(live.url, token=TOKEN) as c:
        yield c


def check(live, task: str, image: bytes, result, top_k: int = 5) -> None:
    live.reference.check(task, image, {"top": [vars(s) for s in result.top]}, top_k=top_k)


def test_tasks_are_typed(client, live):
    tasks = {t.name: t for t in client.tasks()}
    assert {"alpha", "beta"} <= set(tasks)
    beta = client.task("beta")
    assert isinstance(beta, TaskInfo) and beta == tasks["beta"]
    assert beta.labels == live.reference.artifacts["beta"].labels
    assert beta.backbone == "resnet18" and beta.size_bytes > 0 and beta.input_size == 32


def test_predict_takes_paths_bytes_files_and_pil_images(client, live, tmp_path):
    images = [png(1), png(2, size=(50, 20)), png(3), png(4)]
    path = tmp_path / "one.png"
    path.write_bytes(images[0])
    pil = Image.open(io.BytesIO(images[3]))
    answer = client.predict("alpha", [path, images[1], io.BytesIO(images[2]), pil], top_k=3)
    assert isinstance(answer, Prediction) and answer.task == "alpha" and answer.latency_ms > 0
    assert len(answer.results) == 4
    for image, result in zip(images, answer.results, strict=True):
        check(live, "alpha", image, result, top_k=3)
    assert answer.labels == [r.top[0].label for r in answer.results]

    single = client.predict("beta", str(path))  # one image, not in a list
    check(live, "beta", images[0], single.results[0])
    assert single.results[0].label == single.results[0].top[0].label


def test_admin_and_errors_carry_the_servers_code(client, live):
    artifact = live.artifacts["alpha"]
    uploaded = client.upload("client-copy", artifact)
    assert uploaded.name == "client-copy" and uploaded.labels[0] == "alpha-0"
    assert "client-copy" in {t.name for t in client.tasks()}
    client.delete("client-copy")
    with pytest.raises(NotFound) as info:
        client.predict("client-copy", png(5))
    assert info.value.status == 404 and info.value.code == "task_not_found"
    assert "client-copy" in info.value.message

    with Client(live.url) as anonymous, pytest.raises(AuthError) as info:
        anonymous.delete("alpha")
    assert info.value.status == 401
    with Client(live.url, token="wrong") as wrong, pytest.raises(AuthError) as info:
        wrong.upload("x", artifact)
    assert info.value.status == 403 and info.value.code == "forbidden"
    with pytest.raises(NotAnImage) as info:
        client.predict("alpha", b"plain text")
    assert info.value.code == "unsupported_media_type"
    with pytest.raises(BadRequest):
        client.predict("alpha", png(6), top_k=0)


def test_a_task_carries_its_description(client, live, tmp_path):
    from dataclasses import replace

    from piggyback_serve.masks import artifact

    assert client.task("alpha").description == ""  # none given
    described = replace(artifact.read(live.artifacts["alpha"]), description="a test pattern")
    path = artifact.write(described, tmp_path / "described.safetensors")
    assert client.upload("described", path).description == "a test pattern"
    assert client.task("described").description == "a test pattern"
    client.delete("described")


def test_health_and_unreachable_server(client):
    health = client.health()
    assert health.status == "ready" and health.backbone == "resnet18" and health.tasks >= 2
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as nobody, pytest.raises(TransportError):
        nobody.tasks()


def test_url_and_token_from_the_environment(live, monkeypatch):
    monkeypatch.setenv("PIGGY_URL", live.url)
    monkeypatch.setenv("PIGGY_TOKEN", TOKEN)
    with Client() as c:
        c.upload("env-copy", live.artifacts["beta"].read_bytes())
        c.delete("env-copy")


def test_async_client(live):
    images = [png(10 + i) for i in range(6)]

    async def main():
        async with AsyncClient(live.url, token=TOKEN) as c:
            tasks = await c.tasks()
            answers = await asyncio.gather(*(c.predict("beta", [img]) for img in images))
            uploaded = await c.upload("async-copy", live.artifacts["alpha"])
            await c.delete("async-copy")
            with pytest.raises(NotFound):
                await c.task("async-copy")
            return tasks, answers, uploaded, await c.health()

    tasks, answers, uploaded, health = asyncio.run(main())
    assert {"alpha", "beta"} <= {t.name for t in tasks}
    for image, answer in zip(images, answers, strict=True):
        check(live, "beta", image, answer.results[0])
    assert uploaded.name == "async-copy" and health.status == "ready"
