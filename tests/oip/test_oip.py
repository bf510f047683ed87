"""The Open Inference Protocol routes over real HTTP: JSON tensors, and binary data by hand."""

from __future__ import annotations

import base64
import io
import json
import struct

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from piggyback_serve.masks.data import to_tensor
from tests.client.live_server import LABELS, png


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer(http, task: str, tensor: dict, **extra) -> httpx.Response:
    return http.post(f"/v2/models/{task}/infer", json={"inputs": [tensor], **extra})


def expected(live, task: str, image: bytes, k: int) -> tuple[list[str], torch.Tensor]:
    probs = live.reference.probs(task, image)
    scores, indices = probs.topk(k)
    labels = live.reference.artifacts[task].labels
    return [labels[i] for i in indices.tolist()], scores


def test_health_and_metadata(http, live):
    assert http.get("/v2/health/live").json() == {"live": True}
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    server = http.get("/v2").json()
    assert server["name"] == "piggyback-serve" and "binary_tensor_data" in server["extensions"]
    assert set(LABELS) <= set(http.get("/v2/models").json()["models"])

    meta = http.get("/v2/models/beta").json()
    assert meta["name"] == "beta" and len(meta["versions"]) == 1
    size = live.reference.artifacts["beta"].input_size
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]),
        "pixels": ("FP32", [-1, 3, size, size]),
    }
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "labels": "BYTES",
        "scores": "FP32",
    }
    assert meta["parameters"]["labels"] == live.reference.artifacts["beta"].labels
    assert http.get("/v2/models/beta/ready").json() == {"name": "beta", "ready": True}


def test_unknown_model_is_404_in_the_protocols_error_shape(http):
    for r in (
        http.get("/v2/models/nope"),
        http.get("/v2/models/nope/ready"),
        infer(http, "nope", image(b64(png(1)))),
    ):
        assert r.status_code == 404
        assert isinstance(r.json()["error"], str) and "nope" in r.json()["error"]


def test_base64_images_in_json_match_the_offline_model(http, live):
    images = [png(20), png(21, size=(70, 30))]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(i) for i in images]}
    r = infer(http, "beta", tensor, id="req-1", parameters={"top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "beta" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["labels"]["shape"] == out["scores"]["shape"] == [2, 3]
    assert out["labels"]["datatype"] == "BYTES" and out["scores"]["datatype"] == "FP32"
    for row, image in enumerate(images):
        labels, scores = expected(live, "beta", image, 3)
        assert out["labels"]["data"][3 * row : 3 * row + 3] == labels
        got = torch.tensor(out["scores"]["data"][3 * row : 3 * row + 3])
        assert torch.allclose(got, scores, atol=1e-5, rtol=0)


def test_preprocessed_pixels_give_the_same_answer(http, live):
    image = png(22)
    art = live.reference.artifacts["alpha"]
    x = to_tensor(Image.open(io.BytesIO(image)), art.input_size, art.mean, art.std)
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *x.shape], "data": x.tolist()}
    r = infer(http, "alpha", tensor, outputs=[{"name": "labels"}])
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]  # only the requested output
    assert out["name"] == "labels"
    assert out["data"] == expected(live, "alpha", image, 5)[0]  # default top_k 5 (= all labels)


def test_binary_data_extension_by_hand(http, live):
    """Raw image bytes after the JSON header; binary outputs after the response's header."""
    image = png(23)
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [
                {"name": "scores", "parameters": {"binary_data": True}},
                {"name": "labels"},
            ],
            "parameters": {"top_k": 2},
        }
    ).encode()
    r = http.post(
        "/v2/models/alpha/infer",
        content=header + element,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    split = int(r.headers["Inference-Header-Content-Length"])
    body = json.loads(r.content[:split])
    scores_out, labels_out = body["outputs"]
    assert scores_out["parameters"]["binary_data_size"] == 8 and "data" not in scores_out
    scores = np.frombuffer(r.content[split:], dtype="<f4")
    labels, want = expected(live, "alpha", image, 2)
    assert labels_out["data"] == labels
    assert np.allclose(scores, want.numpy(), atol=1e-5)


def image(*data: str, shape=(1,), datatype="BYTES") -> dict:
    return {"name": "image", "datatype": datatype, "shape": list(shape), "data": list(data)}


def pixels(values: int, shape: list[int]) -> dict:
    return {"name": "pixels", "datatype": "FP32", "shape": shape, "data": [0.0] * values}


GOOD = b64(png(1))
BAD_REQUESTS = {
    "not base64": (image("%%%"), {}, 400, "base64"),
    "not an image": (image(b64(b"text")), {}, 415, "image"),
    "shape and data disagree": (image(GOOD, shape=[2]), {}, 400, "shape"),
    "wrong datatype": (image(GOOD, datatype="FP32"), {}, 400, "BYTES"),
    "pixels of the wrong size": (pixels(192, [1, 3, 8, 8]), {}, 400, "shape"),
    "too few pixels": (pixels(1, [1, 3, 32, 32]), {}, 400, "values"),
    "unknown input": ({**image("x"), "name": "labels"}, {}, 400, "unknown input"),
    "top_k 0": (image(GOOD), {"parameters": {"top_k": 0}}, 400, "top_k"),
    "unknown output": (image(GOOD), {"outputs": [{"name": "logits"}]}, 400, "unknown output"),
}


@pytest.mark.parametrize(
    ("tensor", "extra", "status", "words"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
def test_bad_requests_answer_the_protocols_error_shape(http, tensor, extra, status, words):
    r = infer(http, "alpha", tensor, **extra)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"]


def test_malformed_bodies(http):
    r = http.post("/v2/models/alpha/infer", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = http.post("/v2/models/alpha/infer", json={"inputs": []})
    assert r.status_code == 400 and "inputs" in r.json()["error"]
    r = http.post(
        "/v2/models/alpha/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}
    )
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    # The native API keeps its own error shape.
    native = http.post("/predict?task=nope", content=png(1)).json()
    assert native["error"]["code"] == "task_not_found"


def test_repository_index_and_unknown_routes(http, live):
    r = http.post("/v2/repository/index", json={"ready": True})
    assert r.status_code == 200
    assert r.json() == [
        {"name": name, "version": r.json()[i]["version"], "state": "READY"}
        for i, name in enumerate(sorted(live.reference.artifacts))
    ]
    assert "model_repository" in http.get("/v2").json()["extensions"]
    for method, path in (("GET", "/v2/nothing/here"), ("POST", "/v2/repository/models/a/load")):
        r = http.request(method, path)
        assert r.status_code == 404 and set(r.json()) == {"error"}
        assert path in r.json()["error"]
    # A known path with the wrong method is still a 405, in the protocol's shape.
    r = http.get("/v2/models/alpha/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "not allowed" in r.json()["error"]
    assert http.get("/nothing").json()["error"]["code"] == "not_found"  # native shape outside /v2
