"""PIGGY_DECODE=device: JPEGs travel encoded and the engine worker decodes them in batches
(masks/decode.py's decode_jpegs_on_device, nvJPEG on CUDA). Here on the CPU, where the same
function runs through torchvision's CPU decoder: the path is the one CUDA takes."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.server.server_support import TASKS, serving, settings_for

pytestmark = pytest.mark.anyio


def jpeg(seed: int, size=(96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth pictures: JPEG decoders agree closely on them (noise magnifies their rounding).
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


async def answers(client, task: str, images: list[bytes]) -> list[dict]:
    posts = [client.post(f"/predict?task={task}&top_k=100", content=img) for img in images]
    replies = await asyncio.gather(*posts)
    for r in replies:
        assert r.status_code == 200, r.text
    return [r.json()["results"][0]["top"] for r in replies]


def probs(top: list[dict]) -> torch.Tensor:
    return torch.tensor([t["score"] for t in sorted(top, key=lambda t: t["index"])])


async def test_device_decode_answers_as_the_cpu_path(tmp_path, registry_dir, backbone):
    images = [jpeg(i) for i in range(12)]
    task = TASKS[0]
    results = {}
    for mode in ("cpu", "device"):
        settings = settings_for(tmp_path / mode, registry_dir, decode=mode)
        async with serving(settings, backbone) as client:
            assert client.app.state.services.decode_on_device == (mode == "device")
            results[mode] = await answers(client, task, images)
    agree = 0
    for cpu, device in zip(results["cpu"], results["device"], strict=True):
        agree += cpu[0]["index"] == device[0]["index"]
        assert (probs(cpu) - probs(device)).abs().max() <= 0.02
    assert agree / len(images) >= 0.99


async def test_an_undecodable_jpeg_fails_alone_with_415(tmp_path, registry_dir, backbone):
    good = jpeg(1)
    broken = good[: len(good) // 2]  # the header reads, the data stops half way
    settings = settings_for(tmp_path, registry_dir, decode="device", max_delay_ms=50)
    async with serving(settings, backbone) as client:
        task = TASKS[0]
        replies = await asyncio.gather(
            *(client.post(f"/predict?task={task}", content=img) for img in (good, broken, good))
        )
        assert [r.status_code for r in replies] == [200, 415, 200], [r.text for r in replies]
        error = replies[1].json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert error["message"].startswith("image could not be decoded: ")
        not_jpeg = await client.post(f"/predict?task={task}", content=b"\xff\xd8\xffgarbage")
        assert not_jpeg.status_code == 415  # a header that does not read: the CPU path says so
