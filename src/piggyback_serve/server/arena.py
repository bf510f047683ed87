"""Pixels in shared memory: a front end writes each image's pixels once into its arena, and
the engine worker that runs the image's batch reads them from there by `PixelRef`.

An arena is one POSIX shared-memory segment owned by the process that made it (a front
end, or the app when it runs the engine in-process): it allocates and frees rows, and its
resource tracker unlinks the segment when it exits, however it exits. Readers (engine
workers) map a segment by name and never unlink it. A row freed while a worker may still
read it (its request timed out) can only spoil that row's answer, which nobody waits for.
"""

from __future__ import annotations

import bisect
import dataclasses
import mmap
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch

from piggyback_serve.server.protocol import PixelRef

ALIGN = 4096  # rows start on a page: a row never shares a page with another
DEFAULT_BYTES = 128 * 1024 * 1024  # tmpfs pages are only taken when written


@dataclass(frozen=True)
class Encoded:
    """An image kept encoded for the engine worker to decode on its device (a JPEG whose
    header was checked), to the task's input size."""

    data: bytes
    size: int


Row = torch.Tensor | Encoded


class ArenaFull(RuntimeError):
    """No free run of the arena is large enough for the pixels asked for."""


class Arena:
    """A segment this process writes rows into (first fit over a sorted free list)."""

    def __init__(self, size: int = DEFAULT_BYTES):
        self.size = _round_up(size)
        self._shm = shared_memory.SharedMemory(create=True, size=self.size)
        self.name = self._shm.name
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, length), by offset
        self.used = 0

    def put(self, row: Row) -> PixelRef:
        """Copy a row (pixels, uint8 or float32, any shape; or encoded bytes) into a free
        run; its reference."""
        if isinstance(row, Encoded):
            ref = self.put(torch.frombuffer(bytearray(row.data), dtype=torch.uint8))
            return dataclasses.replace(ref, decode_to=row.size)
        # numpy copies the strided view (to_pixels' HWC -> CHW permute) straight into the
        # segment: torch's contiguous() on a permuted uint8 tensor cost ~7x as much.
        array = row.detach().cpu().numpy()
        length = _round_up(max(array.nbytes, 1))
        i = next((i for i, (_, free) in enumerate(self._free) if free >= length), None)
        if i is None:
            raise ArenaFull(
                f"the shared-memory arena ({self.size // 2**20} MiB) has no room for "
                f"{array.nbytes:,} more bytes of pixels ({self.used:,} in use)"
            )
        offset, free = self._free[i]
        if free == length:
            del self._free[i]
        else:
            self._free[i] = (offset + length, free - length)
        self.used += length
        view = np.ndarray(array.shape, array.dtype, buffer=self._shm.buf, offset=offset)
        view[...] = array
        return PixelRef(self.name, offset, tuple(array.shape), array.dtype.str)

    @contextmanager
    def holding(self, rows: Iterable[Row]) -> Iterator[list[PixelRef]]:
        """The rows written in for the block's length, then freed (ArenaFull, with none
        kept, when they do not all fit)."""
        refs: list[PixelRef] = []
        try:
            for row in rows:
                refs.append(self.put(row))
            yield refs
        finally:
            for ref in refs:
                self.free(ref)

    def free(self, ref: PixelRef) -> None:
        """Give a row's run back (merged with its free neighbours)."""
        offset = ref.offset
        length = _round_up(max(ref.nbytes, 1))
        self.used -= length
        i = bisect.bisect(self._free, (offset, 0))
        if i < len(self._free) and offset + length == self._free[i][0]:
            length += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, length = self._free[i - 1][0], self._free[i - 1][1] + length
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, length))

    def close(self) -> None:
        """Unmap and unlink the segment (the resource tracker does it if we never get here)."""
        self._shm.close()
        self._shm.unlink()


class ArenaReader:
    """The segments a reader has mapped, by name; rows read as tensors (views)."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}

    def tensor(self, ref: PixelRef) -> torch.Tensor:
        buffer = self._maps.get(ref.arena)
        if buffer is None:
            buffer = self._maps[ref.arena] = _attach(ref.arena)
        array = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=buffer, offset=ref.offset)
        return torch.from_numpy(array)

    def stack(self, refs: list[PixelRef]) -> torch.Tensor:
        """The rows as one batch tensor (the one copy a batch needs)."""
        return torch.stack([self.tensor(ref) for ref in refs])

    def bytes(self, ref: PixelRef) -> bytes:
        return self.tensor(ref).numpy().tobytes()

    def drop(self, name: str) -> None:
        """Unmap a segment whose owner is gone (its memory returns once nobody maps it)."""
        found = self._maps.pop(name, None)
        if found is not None:
            found.close()


def _attach(name: str) -> mmap.mmap:
    """Map segment `name` (POSIX shared memory lives under /dev/shm on Linux) without
    SharedMemory(name): before Python 3.13 that registered the segment with this process's
    resource tracker, which then unlinked a segment it did not own when this process exited."""
    fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
