"""Codings of one parameter's mask in a format-2 task artifact.

A mask is given by `numel` (the parameter's size) and `off`, the sorted row-major positions
of its switched-off weights. Two codings, each a flat uint8 stream:

bitmap      format 1's layout: the 0/1 mask bit-packed like numpy.packbits (bitorder "big",
            the last byte zero-padded); ceil(numel / 8) bytes.
elias-fano  the positions, Elias–Fano coded. With n = len(off) and l = floor(log2(numel / n)):
            the low l bits of every position (n*l bits), then the high parts in unary, bit
            (off[i] >> l) + i set in n + ((numel - 1) >> l) + 1 bits; each part bit-packed
            like the bitmap and padded to a byte. n = 0 codes to zero bytes.

The writer picks whichever is smaller per parameter (Elias–Fano below ~1/4 switched off).
Why Elias–Fano: close to the masks' entropy at the sparsities trained tasks have, with no
compressor, and its size follows from (n, numel) alone, so a stream is checked against that
size before anything is decoded (no decompression bomb to guard against). The codings
compared, measured on the demo tasks: `python -m bench --scenarios codings`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

BITMAP = "bitmap"
ELIAS_FANO = "elias-fano"
CODINGS = (BITMAP, ELIAS_FANO)


class CodingError(ValueError):
    """A coded mask is malformed; the message says how (the caller names the field)."""


def low_bits(count: int, numel: int) -> int:
    """Elias–Fano's l: floor(log2(numel / count)), in exact integer arithmetic."""
    return (numel // count).bit_length() - 1 if count else 0


def coded_size(coding: str, count: int, numel: int) -> int:
    """Exact length in bytes of a mask of `numel` weights, `count` switched off."""
    if coding == BITMAP:
        return (numel + 7) // 8
    if coding == ELIAS_FANO:
        if count == 0:
            return 0
        low = low_bits(count, numel)
        return (count * low + 7) // 8 + (count + ((numel - 1) >> low) + 1 + 7) // 8
    raise CodingError(f"unknown coding {coding!r} (known: {', '.join(CODINGS)})")


def encode(coding: str, off: np.ndarray, numel: int) -> np.ndarray:
    """Code sorted, unique positions in [0, numel) (int64) as `coding`."""
    if coding == BITMAP:
        keep = np.ones(numel, dtype=bool)
        keep[off] = False
        return np.packbits(keep)
    if coding == ELIAS_FANO:
        return _ef_encode(off, numel)
    raise CodingError(f"unknown coding {coding!r} (known: {', '.join(CODINGS)})")


def smallest(count: int, numel: int) -> str:
    """The coding that takes the fewest bytes (Elias–Fano on a tie: it decodes faster)."""
    return min(reversed(CODINGS), key=lambda c: coded_size(c, count, numel))


def decode(coding: str, data: np.ndarray, count: int, numel: int) -> np.ndarray:
    """The sorted int64 positions a stream codes, checked against (count, numel) throughout."""
    if not 0 <= count <= numel:
        raise CodingError(f"count {count} is outside 0..{numel}")
    expected = coded_size(coding, count, numel)
    if data.size != expected:  # bounds the decoded size before anything is decoded
        raise CodingError(
            f"{coding} stream of {data.size} bytes, expected {expected} "
            f"for {count} of {numel} weights switched off ("
            + ("truncated)" if data.size < expected else "longer than its parameter holds)")
        )
    off = _bitmap_decode(data, numel) if coding == BITMAP else _ef_decode(data, count, numel)
    if off.size != count:
        raise CodingError(f"decodes to {off.size} switched-off weights, count says {count}")
    if off.size and (off[0] < 0 or off[-1] >= numel):
        raise CodingError(f"positions out of range 0..{numel - 1}")
    if off.size > 1 and not (np.diff(off) > 0).all():
        raise CodingError("positions are not sorted or repeat")
    return off


def _bitmap_decode(data: np.ndarray, numel: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(data, count=numel) == 0)


def _ef_encode(off: np.ndarray, numel: int) -> np.ndarray:
    count = off.size
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    low = low_bits(count, numel)
    shifts = np.arange(low - 1, -1, -1, dtype=np.int64)
    lows = ((off[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    high = np.zeros(count + ((numel - 1) >> low) + 1, dtype=np.uint8)
    high[(off >> low) + np.arange(count)] = 1
    return np.concatenate([np.packbits(lows), np.packbits(high)])


def _ef_decode(data: np.ndarray, count: int, numel: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    low = low_bits(count, numel)
    low_bytes = (count * low + 7) // 8
    ones = np.flatnonzero(np.unpackbits(data[low_bytes:], count=count + ((numel - 1) >> low) + 1))
    if ones.size != count:
        raise CodingError(f"decodes to {ones.size} switched-off weights, count says {count}")
    off = (ones - np.arange(count)) << low
    if low:
        bits = np.unpackbits(data[:low_bytes], count=count * low).reshape(count, low)
        off |= bits.astype(np.int64) @ (1 << np.arange(low - 1, -1, -1, dtype=np.int64))
    return off


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean tensor (any shape) into a flat uint8 tensor (the bitmap coding)."""
    flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_bits(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_bits: a bool tensor of `shape`, on the device `bits` lives on."""
    numel = int(np.prod(shape))
    # Unpacking on the device with shifts keeps a cold task cheap on a GPU.
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    unpacked = (bits.reshape(-1, 1) >> shifts) & 1
    return unpacked.reshape(-1)[:numel].reshape(shape).bool()


@dataclass(frozen=True, eq=False)
class Mask:
    """One parameter's mask in memory: a bitmap, or the sorted positions switched off.

    A format-1 file's bitmap does not say its parameter's exact size (up to 7 padding bits),
    so `numel` is None until the artifact is validated against a backbone.
    """

    numel: int | None
    bits: torch.Tensor | None = None  # uint8, the bitmap coding
    off: torch.Tensor | None = None  # int64, sorted row-major positions switched off

    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> Mask:
        return cls(numel=mask.numel(), bits=pack_bits(mask))

    def sized(self, numel: int) -> Mask:
        return replace(self, numel=numel)

    def switched_off(self, numel: int) -> torch.Tensor:
        """Sorted int64 positions of the switched-off weights; no bitmap when coded as such."""
        if self.numel is not None and numel != self.numel:
            raise ValueError(f"the mask covers {self.numel} weights, not {numel}")
        if self.off is not None:
            return self.off
        return torch.from_numpy(_bitmap_decode(self.bits.cpu().numpy(), numel))

    def dense(self, shape: torch.Size | tuple[int, ...], device=None) -> torch.Tensor:
        """The mask as a bool tensor of `shape` (True = weight kept)."""
        if self.bits is not None:
            return unpack_bits(self.bits.to(device), shape)
        keep = torch.ones(int(np.prod(shape)), dtype=torch.bool, device=device)
        keep[self.off.to(device)] = False
        return keep.reshape(shape)

    def coded(self, coding: str | None = None) -> tuple[str, int, np.ndarray]:
        """(coding, switched-off count, stream): the smallest coding unless one is named."""
        if self.numel is None:
            raise ValueError("a format-1 bitmap of unknown size: validate it against a backbone")
        off = self.switched_off(self.numel).numpy()
        coding = coding or smallest(off.size, self.numel)
        if coding == BITMAP and self.bits is not None:
            return coding, off.size, self.bits.numpy()
        return coding, off.size, encode(coding, off, self.numel)
