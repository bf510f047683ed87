"""tritonclient[http] from PyPI, unchanged, against the OIP routes: binary data (its default),
JSON tensors, preprocessed pixels, request compression, and its error reporting."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from piggyback_serve.masks.data import to_tensor
from tests.client.live_server import png

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def triton(live):
    client = httpclient.InferenceServerClient(live.url.removeprefix("http://"))
    yield client
    client.close()


def top(live, task: str, image: bytes, k: int):
    probs = live.reference.probs(task, image)
    scores, indices = probs.topk(k)
    labels = live.reference.artifacts[task].labels
    return [labels[i].encode() for i in indices.tolist()], scores.numpy()


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("alpha") and not triton.is_model_ready("nope")
    assert triton.get_server_metadata()["name"] == "piggyback-serve"
    meta = triton.get_model_metadata("beta")
    assert [i["name"] for i in meta["inputs"]] == ["image", "pixels"]


@pytest.mark.parametrize("binary", [True, False])
def test_images_binary_and_json(triton, live, binary):
    images = [png(40), png(41, size=(33, 90))]
    # In JSON a BYTES element is a string, so the images travel base64-encoded.
    data = images if binary else [base64.b64encode(i) for i in images]
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("labels", "scores")]
    result = triton.infer("beta", [tensor], outputs=outputs, parameters={"top_k": 3})
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (2, 3) and scores.dtype == np.float32
    for row, image in enumerate(images):
        want_labels, want_scores = top(live, "beta", image, 3)
        assert [bytes(x) if binary else x.encode() for x in labels[row]] == want_labels
        assert np.allclose(scores[row], want_scores, atol=1e-5)


def test_pixels_binary_default_outputs_and_gzip(triton, live):
    image = png(42)
    art = live.reference.artifacts["alpha"]
    x = to_tensor(Image.open(io.BytesIO(image)), art.input_size, art.mean, art.std)
    tensor = httpclient.InferInput("pixels", [1, *x.shape], "FP32")
    tensor.set_data_from_numpy(x[None].numpy())
    # No outputs named: tritonclient asks for every output in binary.
    result = triton.infer("alpha", [tensor], request_compression_algorithm="gzip")
    want_labels, want_scores = top(live, "alpha", image, 5)
    assert list(result.as_numpy("labels")[0]) == want_labels
    assert np.allclose(result.as_numpy("scores")[0], want_scores, atol=1e-5)


def test_errors_reach_the_caller(triton):
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        triton.infer("alpha", [tensor])
    assert info.value.status() == "415" and "image" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer("nope", [tensor])
    assert info.value.status() == "404" and "nope" in info.value.message()


def test_repository_index(triton, live):
    index = triton.get_model_repository_index()
    assert [m["name"] for m in index] == sorted(live.reference.artifacts)
    assert all(m["state"] == "READY" and m["version"] for m in index)


def test_unknown_routes_reach_the_caller_as_errors(triton):
    # tritonclient's unload goes to a route this server does not have: a readable 404.
    with pytest.raises(InferenceServerException) as info:
        triton.unload_model("alpha")
    assert info.value.status() == "404" and "/v2/repository/models/alpha/unload" in str(
        info.value.message()
    )
