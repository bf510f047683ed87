"""Every status code of docs/serving.md's table, each followed by a good request that works."""

import asyncio

import pytest
import torch

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.artifact import pack_mask
from piggyback_serve.server.catalog import Catalog
from piggyback_serve.server.registry.dir import ID_FILE
from tests.server.server_support import (
    blocked_engine,
    make_artifact,
    png,
    png_header,
    serving,
    settings_for,
    until,
)

pytestmark = pytest.mark.anyio
GOOD = png(7)


def artifact_files(folder) -> list[tuple[str, int]]:
    """What a folder registry holds but its identity file (made at the server's start)."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != ID_FILE)


async def expect(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


async def still_serves(client, reference) -> None:
    r = await client.post(
        "/predict?task=alpha", content=GOOD, headers={"content-type": "image/png"}
    )
    assert r.status_code == 200, r.text
    reference.check("alpha", GOOD, r.json()["results"][0])


async def test_400_bad_parameters(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        await expect(await client.post("/predict?task=alpha&top_k=0", content=GOOD), 400)
        await expect(await client.post("/predict?task=alpha&top_k=abc", content=GOOD), 400)
        await expect(await client.post("/predict", content=GOOD), 400, "bad_request")
        await expect(await client.post("/predict?task=alpha", content=b""), 400)
        # httpx normalises this to PUT /, which is the page (GET only): never a task name.
        await expect(await client.put("/tasks/..", content=b"x"), 405)
        await expect(await client.put("/tasks/bad.name", content=b"x"), 400, "bad_request")
        await still_serves(client, reference)


async def test_404_unknown_task_and_route(settings, backbone, reference):
    hint = "no task named 'nope'; known tasks: alpha, beta, delta, gamma (see GET /tasks)"
    async with serving(settings, backbone) as client:
        for r in (
            await client.post("/predict?task=nope", content=GOOD),
            await client.get("/tasks/nope"),
            await client.delete("/tasks/nope"),
        ):
            assert (await expect(r, 404, "task_not_found"))["message"] == hint
        r = await client.get("/v2/models/nope")  # the OIP routes share the lookup
        assert r.status_code == 404 and r.json() == {"error": hint}
        await expect(await client.get("/no/such/route"), 404, "not_found")
        await expect(await client.get("/predict"), 405, "method_not_allowed")
        await still_serves(client, reference)


def test_404_names_the_first_ten_tasks_and_counts_the_rest():
    catalog = Catalog(registry=None, backbone=None, prepare=None)
    assert catalog.not_found("x").message == (
        "no task named 'x': no tasks are registered yet (upload one with PUT /tasks/{name})"
    )
    catalog.tasks = {f"t{i:02}": None for i in range(13)}
    message = catalog.not_found("x").message
    shown = ", ".join(f"t{i:02}" for i in range(10))
    assert message == f"no task named 'x'; known tasks: {shown} and 3 more (see GET /tasks)"


async def test_413_body_pixels_and_bombs(tmp_path, registry_dir, backbone, reference):
    settings = settings_for(tmp_path, registry_dir, max_body_bytes=50_000, max_pixels=40 * 48)
    async with serving(settings, backbone) as client:
        big = b"\0" * 60_000
        err = await expect(
            await client.post("/predict?task=alpha", content=big), 413, "payload_too_large"
        )
        assert err["message"] == (
            "request body of 60,000 bytes is over the server's limit of 50,000 bytes "
            "(PIGGY_MAX_BODY_BYTES)"
        )

        async def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b"\0" * 10_000

        err = await expect(await client.post("/predict?task=alpha", content=chunks()), 413)
        assert "limit of 50,000 bytes (PIGGY_MAX_BODY_BYTES)" in err["message"]
        err = await expect(await client.post("/predict?task=alpha", content=png(1, (41, 48))), 413)
        assert err["message"] == (
            "image has 1,968 pixels (41x48), over the limit of 1,920 (PIGGY_MAX_PIXELS)"
        )
        # Pillow refuses this one while opening it: its numbers, in our words, not its text.
        err = await expect(
            await client.post("/predict?task=alpha", content=png_header(50_000, 50_000)), 413
        )
        assert err["message"] == (
            "image has 2,500,000,000 pixels, over the limit of 1,920 (PIGGY_MAX_PIXELS)"
        )
        await still_serves(client, reference)


async def test_413_artifact_too_large(tmp_path, registry_dir, backbone, reference):
    settings = settings_for(tmp_path, registry_dir, max_artifact_bytes=1000)
    async with serving(settings, backbone) as client:
        err = await expect(await client.put("/tasks/new", content=b"\0" * 2000), 413)
        assert err["message"] == (
            "artifact of 2,000 bytes is over the server's limit of 1,000 bytes "
            "(PIGGY_MAX_ARTIFACT_BYTES)"
        )
        await still_serves(client, reference)


async def test_415_not_an_image(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        r = await client.post(
            "/predict?task=alpha", content=b"hello", headers={"content-type": "image/png"}
        )
        await expect(r, 415, "unsupported_media_type")
        r = await client.post(
            "/predict?task=alpha", content=GOOD, headers={"content-type": "text/plain"}
        )
        await expect(r, 415)
        await expect(await client.post("/predict?task=alpha", content=GOOD[:60]), 415)
        files = [("file", ("a.png", GOOD, "image/png")), ("file", ("b.txt", b"text", "text/plain"))]
        err = await expect(await client.post("/predict?task=alpha", files=files), 415)
        assert err["message"] == (
            "part 2 of 2 (field `file`, filename 'b.txt', text/plain): not a supported image "
            "(accepted: JPEG, PNG, WEBP, GIF, BMP, TIFF): the bytes look like text"
        )
        await still_serves(client, reference)


async def test_415_says_what_a_raw_body_that_is_not_an_image_looks_like(
    settings, registry_dir, backbone, reference
):
    artifact = (registry_dir / "alpha.safetensors").read_bytes()
    sent = [  # (content type, body, what the 415 says the bytes look like)
        (None, b"a photo of a cat", "text"),
        ("application/x-www-form-urlencoded", b'{"image": "cat.jpg"}', "JSON text"),
        ("application/octet-stream", artifact, "a safetensors file (a task artifact?"),
        ("image/jpeg", b"<html><body>404</body></html>", "an HTML page"),
    ]
    async with serving(settings, backbone) as client:
        for content_type, body, looks_like in sent:
            headers = {"content-type": content_type} if content_type else {}
            r = await client.post("/predict?task=alpha", content=body, headers=headers)
            err = await expect(r, 415, "unsupported_media_type")
            assert err["message"].startswith("not a supported image (accepted: JPEG, PNG")
            assert f"the bytes look like {looks_like}" in err["message"], err["message"]
        # A content type that says "not an image" is believed, and the 415 says what the
        # bytes really are.
        r = await client.post(
            "/predict?task=alpha", content=GOOD, headers={"content-type": "text/plain"}
        )
        assert (await expect(r, 415))["message"] == (
            "content type 'text/plain' is not an image (the bytes are a PNG image: send it with "
            "content type image/png, or none); send image/* bytes or multipart/form-data "
            "with `file` fields"
        )
        r = await client.post(
            "/predict?task=alpha", content=b"hi", headers={"content-type": "application/json"}
        )
        assert "(the bytes look like text)" in (await expect(r, 415))["message"]
        await still_serves(client, reference)


async def test_422_invalid_artifacts_leave_the_registry_alone(
    settings, registry_dir, backbone, reference
):
    before = artifact_files(registry_dir)
    foreign = make_artifact(backbone, "alpha", seed=9)
    foreign.backbone_sha256 = "0" * 64
    short_mask = make_artifact(backbone, "alpha", seed=9)
    name = next(iter(short_mask.masks))
    short_mask.masks[name] = pack_mask(torch.ones(short_mask.masks[name].numel - 1, dtype=bool))
    async with serving(settings, backbone) as client:
        err = await expect(await client.put("/tasks/alpha", content=b"garbage" * 10), 422)
        assert err["code"] == "invalid_artifact" and err["message"].startswith("file")
        err = await expect(await client.put("/tasks/alpha", content=GOOD), 422)  # an image
        assert err["message"].startswith("file: not a safetensors task artifact"), err
        assert "looks like a PNG image" in err["message"]
        err = await expect(
            await client.put("/tasks/alpha", content=artifacts.to_bytes(foreign)), 422
        )
        assert "backbone_sha256" in err["message"]
        err = await expect(
            await client.put("/tasks/new", content=artifacts.to_bytes(short_mask)), 422
        )
        assert f"mask.{name}" in err["message"]
        assert artifact_files(registry_dir) == before
        assert (await client.get("/tasks/new")).status_code == 404
        await still_serves(client, reference)


async def test_401_403_admin_token(tmp_path, registry_dir, backbone, reference):
    settings = settings_for(tmp_path, registry_dir, admin_token="s3cret")
    data = (registry_dir / "beta.safetensors").read_bytes()
    async with serving(settings, backbone) as client:
        r = await client.put("/tasks/copy", content=data)
        await expect(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        await expect(await client.delete("/tasks/beta", headers={"Authorization": "Basic x"}), 401)
        wrong = {"Authorization": "Bearer nope"}
        await expect(await client.put("/tasks/copy", content=data, headers=wrong), 403, "forbidden")
        await expect(await client.delete("/tasks/beta", headers=wrong), 403)
        assert sorted(p.name for p in registry_dir.iterdir() if p.name != ID_FILE)[:1] == [
            "alpha.safetensors"
        ]
        assert not (registry_dir / "copy.safetensors").exists()
        right = {"Authorization": "Bearer s3cret"}
        assert (await client.put("/tasks/copy", content=data, headers=right)).status_code == 201
        assert (await client.delete("/tasks/copy", headers=right)).status_code == 204
        await still_serves(client, reference)


async def test_503_queue_full_with_retry_after(tmp_path, registry_dir, backbone, reference):
    settings = settings_for(tmp_path, registry_dir, queue_size=2, max_batch_size=1)
    async with serving(settings, backbone) as client:
        batcher = client.app.state.services.batcher
        release = blocked_engine(client)  # every worker busy: nothing leaves the queue
        try:
            queued = [
                asyncio.create_task(client.post("/predict?task=alpha", content=GOOD))
                for _ in range(2)
            ]
            await until(lambda: batcher.depth("alpha") == 2)
            r = await client.post("/predict?task=alpha", content=GOOD)
            await expect(r, 503, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
        finally:
            release.set()
        for response in await asyncio.gather(*queued):
            assert response.status_code == 200
        await still_serves(client, reference)


async def test_504_timeout(tmp_path, registry_dir, backbone, reference):
    # The engine is blocked for the 504, so the timeout need not be tight; 2 s leaves the
    # good request after it room on a loaded CI machine.
    settings = settings_for(tmp_path, registry_dir, request_timeout_s=2.0)
    async with serving(settings, backbone) as client:
        # Warm the cache first so the good request after the 504 fits well inside 2 s.
        await still_serves(client, reference)
        release = blocked_engine(client)
        try:
            await expect(await client.post("/predict?task=alpha", content=GOOD), 504, "timeout")
        finally:
            release.set()
        await still_serves(client, reference)
        metrics = (await client.get("/metrics")).text
        assert 'piggy_errors_total{code="timeout",task="alpha"} 1.0' in metrics


async def test_503_not_ready_when_the_backbone_cannot_load(tmp_path, registry_dir):
    import httpx

    from piggyback_serve.server.app import create_app

    settings = settings_for(tmp_path, registry_dir, backbone_weights=str(tmp_path / "none.pt"))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://piggy") as client:
            svc = app.state.services
            await until(lambda: svc.startup_error is not None)
            r = await client.get("/readyz")
            err = await expect(r, 503, "not_ready")
            assert "none.pt" in err["message"] and r.headers["retry-after"] == "1"
            await expect(await client.post("/predict?task=alpha", content=GOOD), 503, "not_ready")
            await expect(await client.get("/tasks"), 503, "not_ready")
            assert (await client.get("/healthz")).status_code == 200
