"""The Open Inference Protocol (KServe v2) over HTTP, beside the native API: a task is a model.

Spec: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol
plus Triton's binary tensor data extension, which tritonclient uses by default: the JSON
header's length in `Inference-Header-Content-Length`, then each binary tensor's bytes in
input order (a BYTES element is a 4-byte little-endian length and its bytes).

Inputs and outputs are oip_infer.py's (BYTES images are base64 strings in JSON); this file
reads the HTTP request into its `Tensor` and writes the answer, and oip_infer.infer does the
rest, as it does for gRPC (oip_grpc/). Errors answer `{"error": "message"}`, as the
protocol says, with the native API's status codes; so do unknown /v2 routes (404, or 405 on
a known path). POST /v2/repository/index is the repository extension's index (every task
READY); its load/unload are not offered (tasks come and go with PUT/DELETE /tasks).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import zlib
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from piggyback_serve.server import oip_infer
from piggyback_serve.server.auth import require_predict
from piggyback_serve.server.body import read_limited
from piggyback_serve.server.errors import BadRequest, PayloadTooLarge, ServeError
from piggyback_serve.server.oip_infer import OUTPUTS, SERVER_NAME, SERVER_VERSION, Answer, Tensor
from piggyback_serve.server.settings import Settings
from piggyback_serve.server.state import ServicesDep

HEADER_LENGTH = "Inference-Header-Content-Length"


def oip_error(request: Request, status: int, code: str, message: str, headers=None) -> Response:
    request.state.error_code = code  # still counted by the metrics middleware
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class OipRoute(APIRoute):
    """Answers this router's errors in the protocol's shape instead of the native one."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as exc:
                return oip_error(request, exc.status, exc.code, exc.message, exc.headers)
            except RequestValidationError as exc:
                return oip_error(request, 400, "bad_request", str(exc.errors()))
            except HTTPException as exc:
                return oip_error(request, exc.status_code, "http_error", str(exc.detail))

        return handle


class OipError(BaseModel):
    error: str


# Documented on every /v2 route: the protocol's error shape under the native status codes.
_ERRORS = {
    code: {"model": OipError, "description": description}
    for code, description in {
        400: "Bad request",
        401: "Predict token missing",
        403: "Predict token wrong",
        404: "Unknown model (task)",
        413: "Body, image count or pixels over a limit",
        415: "Not an image",
        500: "The batch holding this request failed",
        503: "Overloaded (see Retry-After) or not ready",
        504: "Timed out",
    }.items()
}

router = APIRouter(
    prefix="/v2", tags=["open inference protocol"], route_class=OipRoute, responses=_ERRORS
)


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {
        "name": SERVER_NAME,
        "version": SERVER_VERSION,
        "extensions": ["binary_tensor_data", "model_repository"],
    }


@router.get("/health/live", summary="Server live: 200 when the process answers")
async def live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Server ready: 200 when ready, 400 (as the spec says) if not",
    responses={400: {"description": 'Not ready: `{"ready": false}`'}},
)
async def ready(svc: ServicesDep):
    ok = svc.ready and not svc.catalog.registry_error
    return JSONResponse({"ready": ok}, status_code=200 if ok else 400)


@router.get("/models", summary="The served models (tasks), by name")
async def models(svc: ServicesDep) -> dict:
    return {"models": sorted(svc.require_catalog().tasks)}


@router.get("/models/{name}", summary="Model metadata: inputs, outputs, labels")
async def model_metadata(name: str, request: Request, svc: ServicesDep) -> dict:
    return oip_infer.model_metadata(svc.find_task(request, name))


@router.get("/models/{name}/ready", summary="Model ready: 200 when the task is served")
async def model_ready(name: str, request: Request, svc: ServicesDep) -> dict:
    task = svc.find_task(request, name)
    return {"name": task.name, "ready": True}


@router.post(
    "/models/{name}/infer",
    dependencies=[Depends(require_predict)],
    summary="Classify images (or preprocessed pixels)",
)
async def infer(name: str, request: Request, svc: ServicesDep) -> Response:
    started = time.perf_counter()
    task = svc.find_task(request, name)
    header, binary = await _read(request, svc.settings)
    tensor = _one_input(header, binary)
    top_k = _params(header, "request").get("top_k", oip_infer.DEFAULT_TOP_K)  # null: a 400
    answer = await oip_infer.infer(svc, task, tensor, top_k, started)
    return _response(header, answer)


@router.post(
    "/repository/index",
    summary="Repository index (repository extension): every model (task) and its state",
)
async def repository_index(svc: ServicesDep) -> list[dict]:
    # Every task in the catalog has been validated and is served: all are READY.
    tasks = sorted(svc.require_catalog().tasks.items())
    return [{"name": name, "version": task.version, "state": "READY"} for name, task in tasks]


ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


# Registered last: only what no other /v2 route matched gets here.
@router.api_route("/{path:path}", methods=ALL_METHODS, include_in_schema=False)
async def unknown_route(path: str, request: Request) -> Response:
    """404 (or 405 on a known path) in the protocol's error shape, which tritonclient reads."""
    allowed = _methods_for(request)
    if allowed:
        message = f"method {request.method} not allowed on /v2/{path}; use {', '.join(allowed)}"
        return oip_error(request, 405, "method_not_allowed", message, {"Allow": ", ".join(allowed)})
    return oip_error(request, 404, "not_found", f"no route {request.method} /v2/{path}")


def _methods_for(request: Request) -> list[str]:
    """The methods other routes accept on this path (empty: no route has this path)."""
    methods: set[str] = set()
    for route in router.routes:  # every /v2 route is on this router
        if getattr(route, "endpoint", None) is unknown_route or not hasattr(route, "methods"):
            continue
        if route.matches(request.scope)[0] is Match.PARTIAL:
            methods |= route.methods
    return sorted(methods)


# --- reading a request -----------------------------------------------------------------


async def _read(request: Request, settings: Settings) -> tuple[dict, bytes]:
    """The JSON header (an object) and the binary tensor data that follows it, if any."""
    body = await read_limited(request, settings.max_body_bytes, "request body")
    body = _decompress(body, request.headers.get("content-encoding"), settings.max_body_bytes)
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        split = len(body)
    else:
        try:
            split = int(declared)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} is not a number: {declared!r}") from None
        if not 0 <= split <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {split} is outside the body of {len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the inference request is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    return header, body[split:]


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """gzip or deflate request bodies (tritonclient's request_compression_algorithm)."""
    if encoding in (None, "", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body could not be decompressed: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(
            f"decompressed body is over the server's limit of {limit:,} bytes "
            "(PIGGY_MAX_BODY_BYTES)"
        )
    return data


def _one_input(header: dict, binary: bytes) -> Tensor:
    """The request's single input, its data attached (JSON list or raw bytes)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("`inputs` must be a non-empty list")
    offset, raws = 0, []
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise BadRequest("each input must be an object")
        params = _params(tensor, "input")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {tensor.get('name')!r}: bad binary_data_size {size!r}")
            raws.append(binary[offset : offset + size])
            offset += size
        elif "data" not in tensor:
            raise BadRequest(f"input {tensor.get('name')!r} has neither data nor binary data")
        else:
            raws.append(None)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    if len(inputs) != 1:
        raise BadRequest(f"send exactly one input, `image` or `pixels`; got {len(inputs)}")
    first = inputs[0]
    tensor = Tensor(first.get("name"), first.get("datatype"), first.get("shape"), raws[0])
    oip_infer.check_input(tensor)
    if tensor.raw is None:
        data = _flatten(first["data"])
        tensor.elements = _base64_images(data) if tensor.name == "image" else data
    return tensor


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"{what} parameters must be an object")
    return params


def _base64_images(data: list) -> list[bytes]:
    """In JSON a BYTES element is a string: the images travel base64-encoded."""
    elements = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise BadRequest(f"input 'image' element {i}: expected a base64 string")
        try:
            elements.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"input 'image' element {i} is not valid base64") from None
    return elements


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flatten(item)]


# --- writing the response --------------------------------------------------------------


def _response(header: dict, answer: Answer) -> Response:
    all_binary = bool(_params(header, "request").get("binary_data_output", False))
    requested = header.get("outputs")
    if requested is None:
        wanted = [(name, all_binary) for name in OUTPUTS]
    elif isinstance(requested, list) and all(isinstance(o, dict) for o in requested):
        wanted = [
            (o.get("name"), _params(o, "output").get("binary_data", all_binary)) for o in requested
        ]
    else:
        raise BadRequest("`outputs` must be a list of objects")
    outputs, chunks = [], []
    for name, binary in wanted:
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output {name!r}; this model has `labels` and `scores`")
        out: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": answer.shape}
        if binary:
            raw = answer.labels_raw() if name == "labels" else answer.scores_raw()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif name == "labels":
            out["data"] = [label for row in answer.labels for label in row]
        else:
            out["data"] = answer.scores.reshape(-1).tolist()
        outputs.append(out)
    task = answer.task
    body: dict[str, Any] = {"model_name": task.name, "model_version": task.version}
    if "id" in header:
        body["id"] = header["id"]
    body["parameters"] = {"latency_ms": answer.latency_ms}
    body["outputs"] = outputs
    text = json.dumps(body).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(
        text + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )
