import pytest
from server_support import png, serving

pytestmark = pytest.mark.anyio


async def test_healthz_and_predict(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"} | {
            "backbone": None,
            "registry": None,
            "tasks": None,
        }
        image = png(1)
        r = await client.post(
            "/predict",
            params={"task": "alpha", "top_k": 3},
            content=image,
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "alpha"
        print(body)
        reference.check("alpha", image, body["results"][0])
