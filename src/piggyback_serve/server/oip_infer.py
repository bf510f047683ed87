"""The Open Inference Protocol's infer step, whatever the transport: REST (routes/oip.py) and
gRPC (oip_grpc/) turn their request into one `Tensor` and call `infer`, which checks it,
makes images or pixels of it, classifies through `Services.classify` (the step POST /predict
takes too) and ranks the top k. Errors are the server's own (errors.py); each transport maps
them to its status codes.

Inputs: `image` (BYTES, one encoded image per element) or `pixels` (FP32 [batch, 3, S, S],
already preprocessed with the task's mean/std). Outputs: `labels` (BYTES [batch, k], highest
score first) and `scores` (FP32 [batch, k]); k is the request parameter `top_k` (default 5,
clamped to the label count).
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from piggyback_serve.server.catalog import Task
from piggyback_serve.server.errors import BadRequest, PayloadTooLarge
from piggyback_serve.server.preprocess import prepare_async
from piggyback_serve.server.settings import Settings
from piggyback_serve.server.state import Services

SERVER_NAME, SERVER_VERSION = "piggyback-serve", "0.1.0"
INPUTS = {"image": "BYTES", "pixels": "FP32"}
OUTPUTS = {"labels": "BYTES", "scores": "FP32"}
DEFAULT_TOP_K = 5


@dataclass
class Tensor:
    """One input as the transport read it: either `raw` (row-major binary: little-endian FP32,
    or per BYTES element a 4-byte little-endian length and its bytes) or `elements` (flat:
    the encoded images as bytes, or the numbers)."""

    name: Any
    datatype: Any
    shape: Any
    raw: bytes | None = None
    elements: list | None = None


@dataclass
class Answer:
    task: Task  # as classify returned it
    labels: list[list[str]]  # [batch][k], highest score first
    scores: np.ndarray  # float32 [batch, k]
    latency_ms: float

    def labels_raw(self) -> bytes:
        """`labels` as binary BYTES: per element, its length (4 bytes, little-endian), its bytes."""
        return pack_bytes(label.encode() for row in self.labels for label in row)

    def scores_raw(self) -> bytes:
        return self.scores.astype("<f4").tobytes()

    @property
    def shape(self) -> list[int]:
        return [len(self.labels), len(self.labels[0]) if self.labels else 0]


def model_metadata(task: Task) -> dict:
    """A task as a model: its inputs, outputs and (REST only) parameters."""
    art, size = task.artifact, task.artifact.input_size
    return {
        "name": task.name,
        "versions": [task.version],
        "platform": f"piggyback/{art.backbone}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
        ],
        "parameters": {
            "labels": art.labels,
            "input_size": size,
            "mean": list(art.mean),
            "std": list(art.std),
        },
    }


async def infer(svc: Services, task: Task, tensor: Tensor, top_k: Any, started: float) -> Answer:
    """Check the input, classify it with `task`, rank the top k (`top_k`: the request
    parameter as sent, DEFAULT_TOP_K when absent; null is a 400)."""
    k = check_top_k(top_k)
    check_input(tensor)
    settings = svc.settings
    if tensor.name == "image":
        blobs = image_elements(tensor)
        check_batch(len(blobs), settings)
        images = await prepare_async(
            blobs, task.artifact, settings.max_pixels, on_device=svc.decode_on_device
        )
    else:
        images = pixels(tensor, task, settings)
    task, probs = await svc.classify(task, images, started)
    svc.metrics.images.labels(task.name).inc(len(images))
    labels = task.artifact.labels
    scores, indices = torch.stack(probs).float().topk(min(k, len(labels)), dim=1)
    ranked = [[labels[i] for i in row] for row in indices.tolist()]
    latency_ms = round(1000 * (time.perf_counter() - started), 3)
    return Answer(task, ranked, scores.numpy(), latency_ms)


def check_top_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequest(f"parameter top_k must be an integer of at least 1, not {k!r}")
    return k


def check_input(tensor: Tensor) -> None:
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
    if name not in INPUTS:
        raise BadRequest(f"unknown input {name!r}; this model takes `image` (BYTES) or `pixels`")
    if datatype != INPUTS[name]:
        raise BadRequest(f"input {name!r} must be {INPUTS[name]}, not {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers")


def check_batch(n: int, settings: Settings) -> None:
    if n < 1:
        raise BadRequest("the input holds no image")
    if n > settings.max_images:
        raise PayloadTooLarge(
            f"{n} images in one request; the server's limit is {settings.max_images} "
            "(PIGGY_MAX_IMAGES)"
        )


def image_elements(tensor: Tensor) -> list[bytes]:
    """The encoded images, as many as the shape says."""
    count = math.prod(tensor.shape)
    elements = unpack_bytes(tensor.raw) if tensor.raw is not None else list(tensor.elements or [])
    if len(elements) != count:
        raise BadRequest(f"input 'image' has {len(elements)} elements; its shape says {count}")
    return elements


def pixels(tensor: Tensor, task: Task, settings: Settings) -> list[torch.Tensor]:
    size = task.artifact.input_size
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise BadRequest(f"input 'pixels' must have shape [batch, 3, {size}, {size}], not {shape}")
    check_batch(shape[0], settings)
    try:
        if tensor.raw is not None:
            if len(tensor.raw) % 4:
                raise ValueError(f"{len(tensor.raw)} bytes are no whole number of FP32 values")
            array = np.frombuffer(tensor.raw, dtype="<f4")
        else:
            array = np.asarray(tensor.elements, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"input 'pixels' is not a list of numbers: {exc}") from None
    if array.size != math.prod(shape):
        raise BadRequest(f"input 'pixels' has {array.size} values; shape {shape} needs more")
    if not np.isfinite(array).all():
        raise BadRequest("input 'pixels' holds NaN or infinite values")
    batch = torch.from_numpy(array.astype(np.float32).reshape(shape))
    return list(batch)


def unpack_bytes(raw: bytes) -> list[bytes]:
    """Binary BYTES elements: each a 4-byte little-endian length and its bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest("input 'image': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise BadRequest("input 'image': BYTES element longer than the binary data")
        elements.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return elements


def pack_bytes(elements) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in elements)
