"""decode_jpegs_on_device on a CUDA device (nvJPEG) against the CPU path the front end runs
(masks/decode.py's open_image, DCT-scaled, then data.to_pixels): pixels close, the same
answers from a task. Skipped without CUDA."""

import io

import pytest
import torch
from PIL import Image

from piggyback_serve.masks import data, inference
from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.masks.decode import decode_jpegs_on_device, open_image
from tests.server.server_support import make_artifact

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZE = 224
DEVICE = "cuda"


def jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """scikit-image's photos as sent (451x300 to 640x427), grayscale, resized from 200 px to
    a phone's 4032x3024, and two with an EXIF orientation."""
    from skimage import data as samples

    found = [
        Image.fromarray(f())
        for f in (samples.astronaut, samples.coffee, samples.chelsea, samples.rocket)
    ]
    out = [jpeg(p) for p in found]
    out.append(jpeg(Image.fromarray(samples.camera())))  # grayscale, 512x512
    for i, size in enumerate([(200, 150), (1000, 700), (1920, 1080), (4032, 3024)]):
        out.append(jpeg(found[i % len(found)].resize(size, Image.Resampling.BICUBIC)))
    for orientation in (6, 3):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out.append(jpeg(found[2].resize((1600, 1200)), exif=exif))
    return out


def cpu_pixels(blob: bytes) -> torch.Tensor:
    return data.to_pixels(open_image(io.BytesIO(blob), SIZE), SIZE)


def test_pixels_close_to_the_cpu_path(photos):
    out, failed = decode_jpegs_on_device(photos, SIZE, DEVICE)
    assert failed == {}
    assert out.shape == (len(photos), 3, SIZE, SIZE) and out.device.type == "cuda"
    for i, blob in enumerate(photos):
        diff = (out[i].cpu().float() - cpu_pixels(blob).float()).abs()
        # nvJPEG's IDCT and chroma upsampling, and for large JPEGs the CPU's DCT-scaled
        # decode against the device's whole one: about a level of 255 on average.
        assert diff.mean().item() < 2.5, (i, diff.mean().item())


def test_a_task_answers_the_same(photos):
    backbone = load_backbone("resnet18", "random")
    art = make_artifact(backbone, "device", n_labels=10, seed=5, input_size=SIZE)
    params = inference.materialise(art, backbone)
    out, _ = decode_jpegs_on_device(photos, SIZE, DEVICE)
    device_pixels = out.cpu()
    host_pixels = torch.stack([cpu_pixels(b) for b in photos])
    with torch.inference_mode():
        probs = [
            torch.softmax(
                inference.forward(backbone, params, data.normalise(p, art.mean, art.std)), -1
            )
            for p in (device_pixels, host_pixels)
        ]
    agree = (probs[0].argmax(-1) == probs[1].argmax(-1)).float().mean().item()
    assert agree >= 0.99
    assert (probs[0] - probs[1]).abs().max().item() < 0.02


def test_batched_equals_one_by_one_and_a_bad_image_fails_alone(photos):
    truncated = photos[1][: len(photos[1]) // 2]
    blobs = [photos[0], b"\xff\xd8\xff\xe0 not a JPEG", photos[2], truncated, photos[3]]
    out, failed = decode_jpegs_on_device(blobs, SIZE, DEVICE)
    assert 1 in failed and set(failed) <= {1, 3}
    for i in failed:
        assert not out[i].any()
    for i in set(range(len(blobs))) - set(failed):
        alone, _ = decode_jpegs_on_device([blobs[i]], SIZE, DEVICE)
        assert torch.equal(out[i], alone[0])


def test_work_queued_on_the_callers_stream_is_not_overwritten(photos):
    """pytorch/vision#9606: the decoder's private stream wrote into blocks freed while the
    caller's stream still had reads of them queued (seen on H100s)."""
    n = 1 << 20
    for _ in range(10):
        blocks = [torch.full((n,), float(k), device=DEVICE) for k in range(8)]
        torch.cuda._sleep(50_000_000)  # queue a while of work ahead of the reductions
        sums = [b.sum() for b in blocks]
        del blocks  # freed to the allocator while the reductions are still queued
        decode_jpegs_on_device(photos, SIZE, DEVICE)
        assert [s.item() for s in sums] == [float(k * n) for k in range(8)]
