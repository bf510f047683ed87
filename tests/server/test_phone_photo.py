"""A phone photo (4032x3024 JPEG) through POST /predict: decoded at a DCT scale
(masks/decode.py), it answers as the same photo pre-shrunk by the client does."""

import io

import pytest
from PIL import Image

from piggyback_serve.masks import artifact as artifacts
from tests.server.server_support import make_artifact, serving, settings_for

pytestmark = pytest.mark.anyio

PHONE = (4032, 3024)


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """scikit-image's cat upscaled to a phone's 4032x3024, and that photo shrunk to
    1008x756 as a client might before sending it."""
    from skimage import data

    phone = jpeg(Image.fromarray(data.chelsea()).resize(PHONE, Image.Resampling.BICUBIC))
    shrunk = Image.open(io.BytesIO(phone)).resize((1008, 756), Image.Resampling.LANCZOS)
    return {"phone": phone, "shrunk": jpeg(shrunk)}


async def test_a_phone_photo_answers_as_the_photo_pre_shrunk(tmp_path, backbone, photos):
    registry = tmp_path / "tasks"
    registry.mkdir()
    art = make_artifact(backbone, "phone", n_labels=5, seed=3, input_size=224)
    artifacts.write(art, registry / "phone.safetensors")
    answers = {}
    async with serving(settings_for(tmp_path, registry), backbone) as client:
        for name, blob in photos.items():
            r = await client.post(
                "/predict?task=phone&top_k=5",
                content=blob,
                headers={"content-type": "image/jpeg"},
            )
            assert r.status_code == 200, r.text
            answers[name] = {t["label"]: t["score"] for t in r.json()["results"][0]["top"]}
    phone, shrunk = answers["phone"], answers["shrunk"]
    assert max(phone, key=phone.get) == max(shrunk, key=shrunk.get)
    assert all(abs(phone[label] - shrunk[label]) < 0.05 for label in art.labels), answers
