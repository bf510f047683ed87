"""Bytes to pixels off the event loop, at the task's own input size. The pixels stay uint8:
the engine worker normalises them with the task's mean and std, per batch."""

from __future__ import annotations

import asyncio
import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from masks.artifact import TaskArtifact
from masks.data import to_pixels, upright
from server.errors import NotAnImage, PayloadTooLarge

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Images up to this many pixels (all of a request's together) decode on the event loop:
# 128 x 128 decodes and resizes in well under a millisecond.
INLINE_PIXELS = 128 * 128


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """A decoded image, or 415 (not an image) / 413 (too many pixels, decompression bomb)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            # Checked from the header, before a single pixel is decoded.
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,}"
                )
            image.load()
            image = upright(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise NotAnImage(f"not a supported image (accepted: {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt
        raise NotAnImage(f"image could not be decoded: {exc}") from None
    return image


def prepare(blobs: list[bytes], artifact: TaskArtifact, max_pixels: int) -> list[torch.Tensor]:
    """Decode and run masks' own preprocessing, exactly as in training, up to the pixels."""
    return [to_pixels(decode(blob, max_pixels), artifact.input_size) for blob in blobs]


async def prepare_async(
    blobs: list[bytes], artifact: TaskArtifact, max_pixels: int
) -> list[torch.Tensor]:
    """`prepare` off the event loop; small images (their headers say at most INLINE_PIXELS
    in all) decode on it, where a thread hop would cost more than decoding them."""
    if sum(map(_claimed_pixels, blobs)) <= INLINE_PIXELS:
        return prepare(blobs, artifact, max_pixels)
    return await asyncio.to_thread(prepare, blobs, artifact, max_pixels)


def _claimed_pixels(blob: bytes) -> int:
    """Width x height from the image's header alone (past INLINE_PIXELS if unreadable:
    `decode`, in the thread, says what is wrong with it)."""
    try:
        with Image.open(io.BytesIO(blob), formats=FORMATS) as image:
            width, height = image.size
    except Exception:
        return INLINE_PIXELS + 1
    return width * height
