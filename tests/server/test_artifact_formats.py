"""Format 1 files (written by earlier releases) upload and answer exactly as format 2."""

import pytest

from piggyback_serve.masks import artifact as artifacts
from tests.server.server_support import png, serving

pytestmark = pytest.mark.anyio


async def test_a_format_1_upload_serves_as_its_format_2_twin(settings, registry_dir, backbone):
    art = artifacts.read((registry_dir / "gamma.safetensors").read_bytes())
    artifacts.validate(art, backbone)
    one, two = artifacts.to_bytes(art, "1"), artifacts.to_bytes(art, "2")
    assert len(two) < len(one)
    images = [png(21), png(22)]
    async with serving(settings, backbone) as client:
        answers = {}
        for name, data in (("v1", one), ("v2", two)):
            r = await client.put(f"/tasks/{name}", content=data)
            assert r.status_code == 201, r.text
            assert r.json()["size_bytes"] == len(data)  # what is stored, as uploaded
            assert (registry_dir / f"{name}.safetensors").read_bytes() == data
            files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
            r = await client.post(f"/predict?task={name}&top_k=3", files=files)
            assert r.status_code == 200, r.text
            answers[name] = r.json()["results"]
        assert answers["v1"] == answers["v2"]
        listed = {t["name"]: t["size_bytes"] for t in (await client.get("/tasks")).json()["tasks"]}
        assert listed["v1"] == len(one) and listed["v2"] == len(two)
