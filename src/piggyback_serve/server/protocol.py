"""Every message that crosses a process boundary in the server, as frozen dataclasses.

Two boundaries:
- the engine pool and its workers (server/engine/pool.py ⇄ server/engine/process.py), over
  one multiprocessing pipe per worker (task states travel as torch's shared-memory handles,
  the file_system strategy, not their data);
- front ends and the engine service (server/engine_client.py ⇄ server/service_socket.py),
  over a Unix socket: each message JSON, typed by its class and checked on arrival
  (pydantic), its bytes fields sent raw after it (`write`/`read` below). No pickle.
Pixels never travel in a message: they sit in shared memory (server/arena.py) and a message
carries `PixelRef`s. Probabilities come back as float32 bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from pydantic import TypeAdapter

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
class TierStats:
    """A tier as /metrics shows it (summed over workers for the device tier)."""

    resident: int = 0
    bytes: int = 0
    budget: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def __add__(self, other: TierStats) -> TierStats:
        return TierStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as /readyz (its JSON body, server/schemas.py) and /metrics show it."""

    index: int
    device: str
    pid: int | None
    state: str  # starting, ready, hung (silent past its timeout: being killed), failed, stopped
    busy: bool
    batches: int
    switches: int
    mixed: int
    restarts: int


@dataclass(frozen=True)
class WorkerReport:
    """A worker's counters, sent with every answer."""

    batches: int
    switches: int
    mixed: int
    patched: TaskKey | None  # the task its working copy runs now
    device_state_bytes: int
    device_tier: TierStats | None = None  # where it copies states to the device


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
    version: str  # the task's version that answered (the service may know a newer one)


@dataclass(frozen=True)
class Refused:
    """An error as the HTTP API answers it (server/errors.py's ServeError, rebuilt there)."""

    request_id: int
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # InsufficientStorage's, the label of its metric


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
    version: str  # the registry's version of the stored artifact


@dataclass(frozen=True)
class Deleted:
    request_id: int
    removed: bool


@dataclass(frozen=True)
class RestoreRegistry:
    """POST /registry/restore: write the tasks held through a registry reset back into the
    registry from the service's local copies; answers Restored."""

    request_id: int


@dataclass(frozen=True)
class Restored:
    request_id: int
    restored: tuple[str, ...]
    failed: dict[str, str]  # name -> why it was not written back


@dataclass(frozen=True)
class TaskChanged:
    """A task was uploaded or deleted through another front end: read it again from the
    registry, then say `Reloaded`, before the upload or delete is answered. `deleted`: a
    delete, which goes even for a task held through a registry reset."""

    change_id: int
    name: str
    deleted: bool = False


@dataclass(frozen=True)
class Reloaded:
    change_id: int


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
    workers: tuple[WorkerInfo, ...]
    working_copy_bytes: int
    device_state_bytes: int
    device_tier: TierStats | None
    host_tier: TierStats | None
    queue_depth: int
    failed: dict[str, str]  # tasks whose artifact the service found invalid
    # Tasks the service serves that a registry reset took from the registry (catalog.py).
    held: int = 0


# -- framing over a stream ------------------------------------------------------------------

_STREAM_MESSAGES = (
    Hello,
    Submit,
    Cancel,
    Answer,
    Refused,
    StoreTask,
    DeleteTask,
    Stored,
    Deleted,
    RestoreRegistry,
    Restored,
    TaskChanged,
    Reloaded,
    EngineStatus,
)
_ADAPTERS = {cls.__name__: TypeAdapter(cls) for cls in _STREAM_MESSAGES}
_LENGTH = struct.Struct("!I")
_BLOB = "$blob"  # {"$blob": i}: the i-th raw part after the JSON


async def write(writer: asyncio.StreamWriter, message: object) -> None:
    """Send one message: its JSON, then each bytes field raw, each part length-prefixed."""
    blobs: list[bytes] = []

    def lift(value):
        if isinstance(value, bytes):
            blobs.append(value)
            return {_BLOB: len(blobs) - 1}
        if isinstance(value, list | tuple):
            return [lift(v) for v in value]
        if isinstance(value, dict):
            return {k: lift(v) for k, v in value.items()}
        return value

    body = lift(dataclasses.asdict(message))
    head = json.dumps({"type": type(message).__name__, "body": body}).encode()
    parts = [head, *blobs]
    writer.write(_LENGTH.pack(len(parts)))
    for part in parts:
        writer.write(_LENGTH.pack(len(part)))
        writer.write(part)
    await writer.drain()


async def read(reader: asyncio.StreamReader) -> object:
    """The next message, checked against its class (asyncio.IncompleteReadError once the
    peer is gone; ValueError for a message no class describes)."""
    (count,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    parts = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        parts.append(await reader.readexactly(length))
    head, blobs = json.loads(parts[0]), parts[1:]

    def lower(value):
        if isinstance(value, dict):
            if value.keys() == {_BLOB}:
                return blobs[value[_BLOB]]
            return {k: lower(v) for k, v in value.items()}
        if isinstance(value, list):
            return [lower(v) for v in value]
        return value

    adapter = _ADAPTERS.get(head.get("type"))
    if adapter is None:
        raise ValueError(f"unknown message type {head.get('type')!r}")
    return adapter.validate_python(lower(head["body"]))
