"""Every message that crosses a process boundary in the server, as frozen dataclasses.

Two boundaries:
- the engine pool and its workers (server/engine/pool.py ⇄ server/engine/process.py), over
  one pipe per worker;
- front ends and the engine service (server/engine_client.py ⇄ server/service_socket.py),
  over a Unix socket, framed by `write`/`read` below.
Pixels never travel in a message: they sit in shared memory (server/arena.py) and a message
carries `PixelRef`s. Probabilities come back as float32 bytes. Task states travel as
torch's shared-memory handles (the file_system strategy), not their data.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TaskKey = tuple[str, str]  # (name, version)


@dataclass(frozen=True)
class PixelRef:
    """One image's pixels in a shared-memory arena: segment, byte offset, shape, dtype."""

    arena: str
    offset: int
    shape: tuple[int, ...]
    dtype: str  # numpy's dtype.str: "|u1" (uint8 as decoded), "<f4" (OIP's FP32 pixels)
    # Not 0: the bytes are a JPEG the worker decodes on its device to [3, size, size] uint8.
    decode_to: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def row(self) -> tuple:
        """What rows must share to stack into one batch: the pixels' shape and dtype."""
        if self.decode_to:
            return (3, self.decode_to, self.decode_to), "|u1"
        return self.shape, self.dtype


def probs_to_bytes(p) -> bytes:
    return np.ascontiguousarray(p, dtype=np.float32).tobytes()


def probs_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=np.float32)  # writable, as torch wants


# -- the pool and its workers --------------------------------------------------------------


@dataclass(frozen=True)
class RunBatch:
    """Run one batch. `new_states` holds the states of the tasks among `keys` this worker
    has not been sent yet, so that no batch meets a task the worker does not know."""

    batch_id: int
    keys: tuple[TaskKey, ...]  # one per row
    new_states: dict[TaskKey, Any]  # TaskState (server/engine/task_state.py), shared memory
    pixels: tuple[PixelRef, ...]  # one per row


@dataclass(frozen=True)
class Forget:
    """Drop these tasks' states (deleted, replaced or evicted)."""

    keys: tuple[TaskKey, ...]


@dataclass(frozen=True)
class DropArena:
    """Unmap an arena whose owner (a front end) is gone."""

    name: str


@dataclass(frozen=True)
class Stop:
    """Exit (so does a closed pipe)."""


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class StartFailed:
    reason: str


@dataclass(frozen=True)
class WorkerReport:
    """A worker's counters, sent with every answer."""

    batches: int
    switches: int
    mixed: int
    patched: TaskKey | None  # the task its working copy runs now
    device_state_bytes: int
    device_tier: Any = None  # TierStats where it copies states to the device, else None


@dataclass(frozen=True)
class BatchDone:
    batch_id: int
    probs: tuple[bytes, ...]  # float32 per row
    report: WorkerReport
    undecodable: dict[int, str] = field(default_factory=dict)  # row -> why (JPEG rows)


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    reason: str
    report: WorkerReport


# -- front ends and the engine service ----------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A front end's first message: who it is and the arena its pixels live in."""

    pid: int
    arena: str


@dataclass(frozen=True)
class Submit:
    """Classify these rows with task `task` at `version` (the version the front end lists)."""

    request_id: int
    task: str
    version: str
    rows: tuple[PixelRef, ...]
    timeout_s: float  # what is left of the request's time


@dataclass(frozen=True)
class Cancel:
    """The request gave up (timed out, client gone): drop its rows still waiting."""

    request_id: int


@dataclass(frozen=True)
class Answer:
    request_id: int
    probs: tuple[bytes, ...]
    task: Any = None  # the catalog's Task (header) that answered, where it is not the
    # version the front end named (the service had a newer one): its labels apply


@dataclass(frozen=True)
class Refused:
    """An error as the HTTP API answers it (server/errors.py's ApiError, rebuilt there)."""

    request_id: int
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreTask:
    """PUT /tasks/{name}: validate against the backbone, store, build; answers Stored."""

    request_id: int
    name: str
    data: bytes


@dataclass(frozen=True)
class DeleteTask:
    request_id: int
    name: str


@dataclass(frozen=True)
class Stored:
    request_id: int
    task: Any  # server/catalog.py's Task, header only (no state)


@dataclass(frozen=True)
class Deleted:
    request_id: int
    removed: bool


@dataclass(frozen=True)
class TaskChanged:
    """A task was uploaded (`task`: its catalog Task, header only) or deleted (None)
    through one front end: every other front end lists it so before the upload is
    answered."""

    name: str
    task: Any = None


@dataclass(frozen=True)
class BackboneInfo:
    """What a front end needs of the backbone to check an artifact's header."""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class EngineStatus:
    """The engine as /readyz and /metrics show it, pushed to every front end on change."""

    ready: bool
    startup_error: str | None
    backbone: BackboneInfo | None
    device: str
    workers: tuple[Any, ...]  # WorkerInfo (server/engine/pool.py)
    working_copy_bytes: int
    device_state_bytes: int
    device_tier: Any  # TierStats | None
    host_tier: Any  # TierStats | None
    queue_depth: int
    failed: dict[str, str]  # tasks whose artifact the service found invalid


# -- framing over a stream ------------------------------------------------------------------

_LENGTH = struct.Struct("!Q")


async def write(writer: asyncio.StreamWriter, message: object) -> None:
    """Send one message (our own dataclasses, between our own processes)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)
    await writer.drain()


async def read(reader: asyncio.StreamReader) -> object:
    """The next message; asyncio.IncompleteReadError once the peer is gone."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))
