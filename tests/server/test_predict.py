"""POST /predict and GET /tasks in-process: answers equal the offline masked model's."""

import io

import pytest
from PIL import Image

from tests.server.server_support import TASKS, png, serving

pytestmark = pytest.mark.anyio


async def test_raw_image_matches_offline(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        image = png(1)
        r = await client.post(
            "/predict",
            params={"task": "alpha", "top_k": 3},
            content=image,
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "alpha" and body["latency_ms"] > 0
        assert len(body["results"]) == 1
        reference.check("alpha", image, body["results"][0], top_k=3)


async def test_multipart_several_images_in_order(settings, backbone, reference):
    images = [png(i, size=(30 + 7 * i, 50)) for i in range(3)]
    files = [("file", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
    async with serving(settings, backbone) as client:
        r = await client.post("/predict", params={"task": "beta", "top_k": 2}, files=files)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 3
        for image, result in zip(images, results, strict=True):
            reference.check("beta", image, result, top_k=2)


async def test_top_k_is_clamped_to_the_labels(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        image = png(2)
        r = await client.post("/predict?task=alpha&top_k=100", content=image)
        assert r.status_code == 200
        top = r.json()["results"][0]["top"]
        assert len(top) == len(reference.artifacts["alpha"].labels)
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
        assert abs(sum(t["score"] for t in top) - 1) < 1e-5


async def test_jpeg_and_webp_decode(settings, backbone, reference):
    import io

    from PIL import Image

    async with serving(settings, backbone) as client:
        for fmt, ctype in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
            buf = io.BytesIO()
            Image.open(io.BytesIO(png(3))).save(buf, format=fmt)
            r = await client.post(
                "/predict?task=gamma", content=buf.getvalue(), headers={"content-type": ctype}
            )
            assert r.status_code == 200, r.text
            reference.check("gamma", buf.getvalue(), r.json()["results"][0])


async def test_tasks_listing(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        listing = (await client.get("/tasks")).json()["tasks"]
        assert [t["name"] for t in listing] == sorted(TASKS)
        one = (await client.get("/tasks/delta")).json()
        assert one["labels"] == reference.artifacts["delta"].labels
        assert one["backbone"] == "resnet18"
        assert one["size_bytes"] > 0 and one["sparsity"] == pytest.approx(0.1)
        assert one["metrics"]["dataset"] == "synthetic"


async def test_openapi_documents_routes_and_errors(settings, backbone):
    async with serving(settings, backbone) as client:
        spec = (await client.get("/openapi.json")).json()
        predict = spec["paths"]["/predict"]["post"]
        assert {"400", "404", "413", "415", "503", "504"} <= set(predict["responses"])
        assert "multipart/form-data" in predict["requestBody"]["content"]
        put = spec["paths"]["/tasks/{name}"]["put"]
        assert {"401", "403", "413", "422"} <= set(put["responses"])
        assert (await client.get("/docs")).status_code == 200


def as_jpeg(image: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


async def test_a_raw_body_with_no_or_a_generic_content_type_is_sniffed(
    settings, backbone, reference
):
    image = as_jpeg(png(3))
    generic = (
        None,  # no content type at all
        "application/octet-stream",
        "application/x-www-form-urlencoded",  # what curl --data-binary sends by default
        "application/x-www-form-urlencoded; charset=utf-8",
        "image/png",  # an image type naming another format: the bytes decide too
    )
    async with serving(settings, backbone) as client:
        for content_type in generic:
            headers = {"content-type": content_type} if content_type else {}
            r = await client.post("/predict?task=alpha", content=image, headers=headers)
            assert r.request.headers.get("content-type") == content_type
            assert r.status_code == 200, (content_type, r.text)
            reference.check("alpha", image, r.json()["results"][0])
