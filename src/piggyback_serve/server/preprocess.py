"""Bytes to pixels off the event loop, at the task's own input size. The pixels stay uint8:
the engine worker normalises them with the task's mean and std, per batch. The decode is
masks' own (`masks/decode.py`, as training decodes its files): a large JPEG decodes at the
DCT scale that still covers the task's size."""

from __future__ import annotations

import asyncio
import io
import re
import warnings
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.data import to_pixels
from piggyback_serve.masks.decode import JPEG_FORMATS, TooManyPixels, is_jpeg, open_image
from piggyback_serve.server.arena import Encoded
from piggyback_serve.server.errors import NotAnImage, PayloadTooLarge
from piggyback_serve.server.sniff import describe

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Images up to this many pixels (all of a request's together) decode on the event loop:
# 128 x 128 decodes and resizes in well under a millisecond.
INLINE_PIXELS = 128 * 128


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """A decoded image, or 415 (not an image) / 413 (too many pixels, decompression bomb)."""
    return _decode(data, max_pixels, None)


def _decode(data: bytes, max_pixels: int, size: int | None) -> Image.Image:
    """`decode` through masks' own `open_image`, as training decodes its files: with `size`,
    a JPEG of at least 2 x `size` decodes at the DCT scale that still covers it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # The pixel limit is checked from the header, before a single pixel is decoded.
            return open_image(io.BytesIO(data), size, formats=FORMATS, max_pixels=max_pixels)
    except TooManyPixels as exc:
        pixels = exc.width * exc.height
        raise PayloadTooLarge(
            f"image has {pixels:,} pixels ({exc.width}x{exc.height}), over the limit "
            f"of {max_pixels:,} ({PIXELS_SETTING})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(str(exc), max_pixels) from None
    except UnidentifiedImageError:
        raise NotAnImage(
            f"not a supported image (accepted: {', '.join(FORMATS)}): the bytes look like "
            f"{describe(data)}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt
        raise NotAnImage(f"image could not be decoded: {exc}") from None


PIXELS_SETTING = "PIGGY_MAX_PIXELS"
# Pillow's own words: "Image size (N pixels) exceeds limit of M pixels, could be ...".
_BOMB_TEXT = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def _bomb(pillow_message: str, max_pixels: int) -> PayloadTooLarge:
    """Pillow refused the image while opening it (its size is not known to us then): the
    413 in our words, with the numbers Pillow's message carries, not Pillow's message."""
    found = _BOMB_TEXT.search(pillow_message)
    if found is None:
        return PayloadTooLarge(
            f"image has more pixels than the limit of {max_pixels:,} ({PIXELS_SETTING})"
        )
    pixels, pillow_limit = map(int, found.groups())
    if pixels > max_pixels:
        return PayloadTooLarge(
            f"image has {pixels:,} pixels, over the limit of {max_pixels:,} ({PIXELS_SETTING})"
        )
    return PayloadTooLarge(  # PIGGY_MAX_PIXELS above Pillow's guard: the guard still holds
        f"image has {pixels:,} pixels, over Pillow's decompression-bomb limit of "
        f"{pillow_limit:,} ({PIXELS_SETTING} can lower the limit, not raise it past that)"
    )


def prepare(
    blobs: list[bytes],
    artifact: TaskArtifact,
    max_pixels: int,
    names: Sequence[str] | None = None,
    on_device: bool = False,
) -> list[torch.Tensor | Encoded]:
    """Decode and run masks' own preprocessing, exactly as in training, up to the pixels.
    With `names` (one per blob), an image's 413/415 starts with its name. With `on_device`,
    a JPEG whose header is in bounds stays encoded, for the engine worker to decode."""
    tensors: list[torch.Tensor | Encoded] = []
    for i, blob in enumerate(blobs):
        if on_device and _device_jpeg(blob, max_pixels):
            tensors.append(Encoded(blob, artifact.input_size))
            continue
        try:
            image = _decode(blob, max_pixels, artifact.input_size)
        except (NotAnImage, PayloadTooLarge) as exc:
            if names is None:
                raise
            raise type(exc)(f"{names[i]}: {exc.message}") from None
        tensors.append(to_pixels(image, artifact.input_size))
    return tensors


async def prepare_async(
    blobs: list[bytes],
    artifact: TaskArtifact,
    max_pixels: int,
    names: Sequence[str] | None = None,
    on_device: bool = False,
) -> list[torch.Tensor | Encoded]:
    """`prepare` off the event loop; small images (their headers say at most INLINE_PIXELS
    in all) decode on it, where a thread hop would cost more than decoding them, and so do
    JPEGs the device decodes (only their headers are read here)."""
    if on_device and all(_device_jpeg(blob, max_pixels) for blob in blobs):
        return [Encoded(blob, artifact.input_size) for blob in blobs]
    if sum(map(_claimed_pixels, blobs)) <= INLINE_PIXELS:
        return prepare(blobs, artifact, max_pixels, names, on_device)
    return await asyncio.to_thread(prepare, blobs, artifact, max_pixels, names, on_device)


def _device_jpeg(blob: bytes, max_pixels: int) -> bool:
    """A JPEG the device may decode: its header reads and is within the pixel limit. Any
    doubt goes to the CPU path, which says what is wrong."""
    if not is_jpeg(blob):
        return False
    try:
        with Image.open(io.BytesIO(blob), formats=JPEG_FORMATS) as image:
            width, height = image.size
    except Exception:  # Pillow's errors for a bad header are many: the CPU path names it
        return False
    return width * height <= max_pixels


def image_format(data: bytes) -> str | None:
    """The image format the bytes' header names ("JPEG", "PNG", ...), or None: what the body
    is, whatever its content type claims. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return image.format
    except Exception:  # not an image Pillow knows, or a header it can't read
        return None


def _claimed_pixels(blob: bytes) -> int:
    """Width x height from the image's header alone (past INLINE_PIXELS if unreadable:
    `decode`, in the thread, says what is wrong with it)."""
    try:
        with Image.open(io.BytesIO(blob), formats=FORMATS) as image:
            width, height = image.size
    except Exception:
        return INLINE_PIXELS + 1
    return width * height
