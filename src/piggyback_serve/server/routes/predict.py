"""POST /predict: route → preprocess → batcher → engine → response."""

from __future__ import annotations

import time
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from piggyback_serve.server.auth import require_predict
from piggyback_serve.server.body import parse_form, read_limited
from piggyback_serve.server.errors import BadRequest, NotAnImage, responses
from piggyback_serve.server.preprocess import image_format, prepare_async
from piggyback_serve.server.schemas import Prediction
from piggyback_serve.server.settings import Settings
from piggyback_serve.server.sniff import describe
from piggyback_serve.server.state import ServicesDep

router = APIRouter(tags=["predict"])

_BODY = {
    "requestBody": {
        "required": True,
        "description": "One raw image (an image/* content type; or application/octet-stream, "
        "application/x-www-form-urlencoded or none, and the bytes say which format), or "
        "multipart/form-data with one or more `file` fields (several images, answered in order).",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
        },
    }
}
# A raw body's content type, read as a hint: image/* (any: the bytes decide which format),
# or none at all and the generic ones tools send when they don't know (curl --data-binary
# says application/x-www-form-urlencoded): the bytes decide. Any other type (text/plain,
# application/json, ...) is a claim that the body is not an image: 415, saying what it is.
IMAGE_TYPES = "image/"
GENERIC_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")
FIELD = "file"  # the multipart field that carries images, one part per image


@router.post(
    "/predict",
    response_model=Prediction,
    openapi_extra=_BODY,
    dependencies=[Depends(require_predict)],
    responses=responses(400, 401, 403, 404, 413, 415, 422, 500, 503, 504),
    summary="Classify one or more images with a task",
)
async def predict(
    request: Request,
    svc: ServicesDep,
    task: Annotated[str, Query(description="name of a registered task")],
    top_k: Annotated[int, Query(ge=1, description="labels per image; clamped to label count")] = 5,
) -> JSONResponse:
    started = time.perf_counter()
    found = svc.find_task(request, task)
    settings = svc.settings
    blobs, names = await _images(request, settings)
    tensors = await prepare_async(
        blobs, found.artifact, settings.max_pixels, names, svc.decode_on_device
    )
    found, probs = await svc.classify(found, tensors, started)
    svc.metrics.images.labels(found.name).inc(len(blobs))
    labels = found.artifact.labels
    scores, indices = torch.stack(probs).topk(min(top_k, len(labels)), dim=1)
    results = [
        {"top": [{"label": labels[i], "index": i, "score": s} for s, i in zip(*row, strict=True)]}
        for row in zip(scores.tolist(), indices.tolist(), strict=True)
    ]
    latency_ms = round(1000 * (time.perf_counter() - started), 3)
    # The body as Prediction describes it, built as plain JSON: validating our own answer
    # through the model cost a visible share of the HTTP side's CPU per request.
    body = {"task": found.name, "results": results, "latency_ms": latency_ms}
    return JSONResponse(body)


async def _images(request: Request, settings: Settings) -> tuple[list[bytes], list[str] | None]:
    """The images' bytes, and for a multipart body the name of each one's part (for errors)."""
    content_type = request.headers.get("content-type", "").lower()
    body = await read_limited(request, settings.max_body_bytes, "request body")
    if content_type.startswith("multipart/form-data"):
        form = await parse_form(request, body, settings.max_images)
        files = [f for f in form.getlist(FIELD) if not isinstance(f, str)]
        if not files:
            raise _no_file_parts(form)
        names = [
            f"part {i} of {len(files)} (field `{FIELD}`, filename {f.filename!r}, "
            f"{f.content_type or 'no content type'})"
            for i, f in enumerate(files, 1)
        ]
        return [await f.read() for f in files], names
    media_type = content_type.partition(";")[0].strip()
    if not (media_type.startswith(IMAGE_TYPES) or media_type in GENERIC_TYPES):
        raise _not_an_image_type(media_type, body)
    if not body:
        raise BadRequest("empty body: send an image")
    return [body], None


def _not_an_image_type(media_type: str, body: bytes) -> NotAnImage:
    """The 415 for a raw body whose content type says it is something else than an image."""
    what = f"the bytes look like {describe(body)}"
    if found := image_format(body):
        what = (
            f"the bytes are a {found} image: send it with content type "
            f"image/{found.lower()}, or none"
        )
    return NotAnImage(
        f"content type {media_type!r} is not an image ({what}); send image/* bytes or "
        f"multipart/form-data with `{FIELD}` fields"
    )


def _no_file_parts(form: FormData, shown: int = 10) -> BadRequest:
    """The 400 for a multipart body without an image: what each part was instead."""
    parts = [
        f"part {name!r} is a text field, not a file"
        if isinstance(value, str)
        else f"part {name!r} is a file, but not named `{FIELD}`"
        for name, value in form.multi_items()
    ]
    got = "; ".join(parts[:shown]) or "it has no parts"
    if len(parts) > shown:
        got += f"; and {len(parts) - shown} more parts"
    return BadRequest(
        f"multipart body has no image: {got}. Send each image as a file part named "
        f"`{FIELD}` (curl -F {FIELD}=@photo.jpg)"
    )
