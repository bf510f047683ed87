"""Image bytes or files to upright images, decoded where it is cheapest.

`open_image` is the one decode that training (`data.as_image`) and serving
(`server/preprocess.py`) share: a JPEG at least twice the task's input size decodes at the
smallest DCT scale (1/2, 1/4, 1/8) that still leaves its shorter side at or above that size,
so the resize that follows (`data.to_pixels`) still only shrinks. A 4032x3024 phone photo
for a 224 px task decodes at 1/8 instead of whole.

`decode_jpegs_on_device` decodes a batch of JPEGs with torchvision (nvJPEG on CUDA) and
gives them `to_pixels`' geometry there, for an engine worker that owns a device.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from piggyback_serve.masks.errors import MasksError

JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a phone's multi-picture JPEG, opened as JPEG
_SOI = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


class TooManyPixels(MasksError):
    """The image's header claims more pixels than allowed: nothing was decoded."""

    def __init__(self, width: int, height: int, max_pixels: int):
        super().__init__(f"{width}x{height} is over {max_pixels:,} pixels")
        self.width, self.height, self.max_pixels = width, height, max_pixels


def open_image(
    source: str | Path | BinaryIO,
    size: int | None = None,
    *,
    formats: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Opened, checked against `max_pixels` from its header, decoded (DCT-scaled when it is
    a JPEG of at least 2 x `size`) and upright. Raises Pillow's own errors for what it can't
    read, and TooManyPixels."""
    with Image.open(source, formats=formats) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise TooManyPixels(width, height, max_pixels)
        if size is not None:
            dct_scale(image, size)
        image.load()
        return upright(image)  # a new image: the file closes with the `with`


def upright(image: Image.Image) -> Image.Image:
    """As a viewer shows it: EXIF orientation applied, 16-bit and float scaled to 8 bits
    (Pillow's own convert("RGB") would clip every value above 255 to white)."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # else no copy (py-spy saw it)
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 onto 0..255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), "L")
    return image


def dct_scale(image: Image.Image, size: int) -> int:
    """Ask the JPEG decoder for the smallest DCT scale that keeps the shorter side at least
    `size` (before load); the scale denominator it will use (1: decoded whole)."""
    width, height = image.size
    if image.format not in JPEG_FORMATS or min(width, height) < 2 * size:
        return 1
    # Pillow picks the largest of 8, 4, 2 not above min(width // size, height // size), and
    # keeps the mode as it is (only RGB to L or YCbCr would change it).
    image.draft(image.mode, (size, size))
    return -(-width // image.size[0])


# ---------------------------------------------------------------------------------------
# On a device (torchvision.io.decode_jpeg: nvJPEG on CUDA, libjpeg on the CPU)


def is_jpeg(blob: bytes) -> bool:
    """The bytes start as a JPEG does (SOI and a marker): worth trying on the device."""
    return blob[:3] == _SOI


def decode_jpegs_on_device(
    blobs: Sequence[bytes], size: int, device: str | torch.device
) -> tuple[torch.Tensor, dict[int, str]]:
    """JPEGs decoded on `device` in one batch, upright, shorter side resized to `size`
    (bilinear, antialiased as Pillow does), centre-cropped: uint8 [n, 3, size, size] there,
    and {index: why} for those that failed (their rows are zeros: decode them on the CPU).
    Pass JPEGs only (`is_jpeg`)."""
    device = torch.device(device)
    out = torch.zeros((len(blobs), 3, size, size), dtype=torch.uint8, device=device)
    failed: dict[int, str] = {}
    if not blobs:
        return out, failed
    decoded = _decode_batch(
        [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], device, failed
    )
    for i, image in enumerate(decoded):
        if image is not None:
            out[i] = fit(orient(image, exif_orientation(blobs[i])), size)
    return out, failed


def _decode_batch(
    datas: list[torch.Tensor], device: torch.device, failed: dict[int, str]
) -> list[torch.Tensor | None]:
    if device.type == "cuda":
        # pytorch/vision#9606: the CUDA decode writes on its own stream, unordered against the
        # caller's, and on H100s overwrote memory that queued work on the caller's stream was
        # still reading (freed blocks the allocator handed to the decoder). Drain it first.
        torch.cuda.current_stream(device).synchronize()
    try:
        images: list[torch.Tensor | None] = list(_decode_jpeg(datas, device))
    except RuntimeError:  # one bad image fails the whole call: find it alone
        images = [None] * len(datas)
    if device.type == "cuda" and len(datas) > 1:
        # Batched hardware decodes have returned an image as decoded when the engine had
        # skipped it, all zeros (nvJPEG batches on newer GPUs, e.g. MrNeRF/LichtFeld-Studio
        # #616, #1924): an all-black row is decoded again alone, and what that gives stands.
        done = [i for i, image in enumerate(images) if image is not None]
        peaks = torch.stack([images[i].amax() for i in done]).tolist() if done else []
        for i, peak in zip(done, peaks, strict=True):
            if peak == 0:
                images[i] = None
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = _decode_jpeg([datas[i]], device)[0]
            except RuntimeError as exc:
                failed[i] = f"JPEG could not be decoded on {device.type}: {exc}"
    return images


def _decode_jpeg(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: TorchCodec next
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def exif_orientation(blob: bytes) -> int:
    """The EXIF orientation tag (1..8; 1 when absent or unreadable), from the header only.
    torchvision's `apply_exif_orientation` exists on the CPU only: this and `orient` give both
    devices one path, the same transforms Pillow's `exif_transpose` makes."""
    try:
        with Image.open(io.BytesIO(blob), formats=JPEG_FORMATS[:1]) as image:
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - no readable EXIF: as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as a viewer shows it for EXIF `orientation` (Pillow's exif_transpose)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (bilinear, antialiased when shrinking, as Pillow's resize is),
    centre crop: a uint8 [3, H, W] tensor to [3, size, size], on its device. The one resize
    of training and serving, CPU and device alike (`data.to_pixels` calls it)."""
    h, w = image.shape[-2:]
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        if image.device.type == "cpu":
            # torch's uint8 kernel: Pillow's pixels to within one level, about 3x faster
            # than Pillow's own resize (bench/results/decode.md).
            image = F.interpolate(
                image[None], (new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )[0]
        else:
            resized = F.interpolate(
                image[None].float(),
                size=(new_h, new_w),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image[:, top : top + size, left : left + size]
