"""The Open Inference Protocol over gRPC (server/oip_grpc) through tritonclient.grpc from PyPI,
unchanged, against a real server on loopback: metadata, images and pixels answering what
POST /predict answers, the server's errors as gRPC status codes, the predict token as
metadata, the limits, and PIGGY_GRPC_PORT=0."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from piggyback_serve.masks.data import to_tensor
from piggyback_serve.server import oip_grpc
from piggyback_serve.server.app import create_app
from piggyback_serve.server.errors import NotReady, Overloaded
from piggyback_serve.server.metrics import Metrics
from tests.client.live_server import TOKEN, png, running
from tests.server.server_support import settings_for

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

PREDICT = "pr3dict"
MAX_IMAGES = 4
MAX_BODY = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, live_artifacts):
    """tasks alpha and beta, REST and gRPC, predict token PREDICT, small limits."""
    home = tmp_path_factory.mktemp("grpc_home")
    registry = home / "tasks"
    registry.mkdir()
    for path in live_artifacts.values():
        shutil.copy(path, registry / path.name)
    port = free_port()
    settings = settings_for(
        home,
        registry,
        admin_token=TOKEN,
        predict_token=PREDICT,
        grpc_port=port,
        max_images=MAX_IMAGES,
        max_body_bytes=MAX_BODY,
    )
    with running(create_app(settings)) as url:
        yield SimpleNamespace(url=url, grpc=f"127.0.0.1:{port}")


AUTH = {"authorization": f"Bearer {PREDICT}"}


@pytest.fixture
def triton(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    yield client
    client.close()


def images_input(images: list[bytes]):
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def predict(server, task: str, images: list[bytes], k: int) -> list[dict]:
    files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    r = httpx.post(
        f"{server.url}/predict", params={"task": task, "top_k": k}, files=files, headers=AUTH
    )
    assert r.status_code == 200, r.text
    return r.json()["results"]


def failure(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("alpha") and not triton.is_model_ready("nope")
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "piggyback-serve" and "model_repository" in meta["extensions"]
    model = triton.get_model_metadata("beta", as_json=True)
    assert model["name"] == "beta" and len(model["versions"]) == 1
    shapes = {i["name"]: (i["datatype"], i["shape"]) for i in model["inputs"]}
    assert shapes == {"image": ("BYTES", ["-1"]), "pixels": ("FP32", ["-1", "3", "32", "32"])}
    assert {o["name"]: o["datatype"] for o in model["outputs"]} == {
        "labels": "BYTES",
        "scores": "FP32",
    }
    index = triton.get_model_repository_index(as_json=True)["models"]
    assert [m["name"] for m in index] == ["alpha", "beta"]


def test_images_answer_what_predict_answers(triton, server):
    images = [png(50), png(51, size=(33, 90)), png(52, size=(64, 20))]
    result = triton.infer(
        "beta", [images_input(images)], parameters={"top_k": 3}, headers=AUTH, request_id="r-1"
    )
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (3, 3) and scores.dtype == np.float32
    assert result.get_response().id == "r-1"
    for row, want in enumerate(predict(server, "beta", images, 3)):
        assert [bytes(x).decode() for x in labels[row]] == [t["label"] for t in want["top"]]
        assert np.allclose(scores[row], [t["score"] for t in want["top"]], atol=1e-6, rtol=0)


def test_bytes_contents_and_pixels(triton, server):
    image = png(53)
    want = predict(server, "alpha", [image], 5)[0]["top"]
    # BYTES in the typed contents instead of raw_input_contents (as other clients send them).
    request = grpcclient.service_pb2.ModelInferRequest(model_name="alpha")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(image)
    response = triton._client_stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    names = [o.name for o in response.outputs]
    assert names == ["labels", "scores"]
    scores = np.frombuffer(response.raw_output_contents[1], dtype="<f4")
    assert np.allclose(scores, [t["score"] for t in want], atol=1e-6, rtol=0)
    # Preprocessed FP32 pixels, one output asked for.
    art = Image.open(io.BytesIO(image))
    x = to_tensor(art, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = grpcclient.InferInput("pixels", [1, *x.shape], "FP32")
    pixels.set_data_from_numpy(x[None].numpy())
    outputs = [grpcclient.InferRequestedOutput("labels")]
    result = triton.infer("alpha", [pixels], outputs=outputs, headers=AUTH)
    assert result.as_numpy("scores") is None
    assert [bytes(b).decode() for b in result.as_numpy("labels")[0]] == [t["label"] for t in want]


def test_errors_are_status_codes_with_our_message(triton):
    not_image = images_input([b"not an image"])
    error = failure(lambda: triton.infer("nope", [not_image], headers=AUTH))
    assert error.status() == "StatusCode.NOT_FOUND" and "nope" in error.message()
    error = failure(lambda: triton.infer("alpha", [not_image], headers=AUTH))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "image" in error.message()
    error = failure(lambda: triton.infer("alpha", [images_input([png(1)] * 5)], headers=AUTH))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "PIGGY_MAX_IMAGES" in error.message()
    error = failure(
        lambda: triton.infer(
            "alpha", [images_input([png(1)])], parameters={"top_k": 0}, headers=AUTH
        )
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "top_k" in error.message()
    wrong = grpcclient.InferInput("image", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    error = failure(lambda: triton.infer("alpha", [wrong], headers=AUTH))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "BYTES" in error.message()
    # Over the body limit: our message; far over it, grpc refuses it before reading it whole.
    error = failure(lambda: triton.infer("alpha", [images_input([b"x" * MAX_BODY])], headers=AUTH))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "PIGGY_MAX_BODY_BYTES" in error.message()
    huge = images_input([b"x" * 2 * MAX_BODY])
    assert (
        failure(lambda: triton.infer("alpha", [huge])).status() == "StatusCode.RESOURCE_EXHAUSTED"
    )
    # Methods of Triton's service this server does not offer.
    error = failure(lambda: triton.get_model_config("alpha"))
    assert error.status() == "StatusCode.UNIMPLEMENTED"


def test_predict_token_as_metadata(triton):
    tensor = images_input([png(54)])
    error = failure(lambda: triton.infer("alpha", [tensor]))
    assert error.status() == "StatusCode.UNAUTHENTICATED" and "Bearer" in error.message()
    error = failure(lambda: triton.infer("alpha", [tensor], headers={"authorization": "Bearer x"}))
    assert error.status() == "StatusCode.PERMISSION_DENIED"
    admin = {"authorization": f"Bearer {TOKEN}"}
    assert triton.infer("alpha", [tensor], headers=admin).as_numpy("labels").shape == (1, 5)


def test_metrics_count_grpc_calls(server, triton):
    triton.infer("alpha", [images_input([png(55)])], headers=AUTH)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in text


class _NotLoaded:
    """Services before the backbone is loaded."""

    settings = settings_for("/nowhere", "/nowhere", grpc_port=1)
    metrics = Metrics()
    ready = False
    catalog = None

    def require_catalog(self):
        raise NotReady("not ready: the backbone is still loading")


def test_not_ready_is_unavailable_and_port_zero_is_off():
    async def main():
        settings = settings_for("/nowhere", "/nowhere", grpc_port=free_port())
        svc = _NotLoaded()
        assert await oip_grpc.start(svc, settings.model_copy(update={"grpc_port": 0})) is None
        server = await oip_grpc.start(svc, settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await infer(b"")
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "still loading" in info.value.details()
        finally:
            await oip_grpc.stop(server)

    asyncio.run(main())


def test_a_port_taken_fails_the_start_clearly():
    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            settings = settings_for("/nowhere", "/nowhere", grpc_port=port)
            with pytest.raises(oip_grpc.GrpcBindError, match="PIGGY_GRPC_PORT"):
                await oip_grpc.start(_NotLoaded(), settings)

    asyncio.run(main())


def test_grpc_port_setting(monkeypatch):
    from piggyback_serve.server.settings import Settings

    assert Settings().grpc_port == 8001
    monkeypatch.setenv("PIGGY_GRPC_PORT", "0")
    assert Settings().grpc_port == 0  # and start() binds nothing (above)
    monkeypatch.setenv("PIGGY_GRPC_PORT", "70000")
    with pytest.raises(ValueError):
        Settings()


def test_the_compiled_descriptor_is_the_proto():
    """server/oip_grpc/_descriptor.py is grpc_predict_v2.proto as it stands (generate.py
    rewrites it)."""
    pytest.importorskip("grpc_tools")
    import base64

    from google.protobuf import descriptor_pb2

    from piggyback_serve.server.oip_grpc import generate
    from piggyback_serve.server.oip_grpc._descriptor import SERIALIZED

    def parse(data: bytes):
        return descriptor_pb2.FileDescriptorProto.FromString(data)

    assert parse(base64.b64decode(SERIALIZED)) == parse(generate.compiled())


def test_retry_after_travels_as_trailing_metadata():
    async def main():
        settings = settings_for("/nowhere", "/nowhere", grpc_port=free_port())
        server = await oip_grpc.start(_Overloaded(), settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert ("retry-after", "3") in tuple(info.value.trailing_metadata())
        finally:
            await oip_grpc.stop(server)

    asyncio.run(main())


class _Overloaded(_NotLoaded):
    def require_catalog(self):
        raise Overloaded("queue full", retry_after_s=3)
