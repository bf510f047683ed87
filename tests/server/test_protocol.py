"""server/protocol.py: what front ends and the engine service say, over a stream: typed
JSON with raw bytes after it, checked against its class on arrival. No pickle."""

from __future__ import annotations

import asyncio
import json
import struct

import pydantic
import pytest

from piggyback_serve.server import protocol as p

pytestmark = pytest.mark.anyio

MESSAGES = [
    p.Hello(12, "psm_abc"),
    p.Submit(1, "flowers", "v1", (p.PixelRef("psm_abc", 4096, (3, 32, 32), "|u1"),), 2.5),
    p.Submit(2, "flowers", "v1", (p.PixelRef("psm_abc", 0, (5000,), "|u1", 224),), 2.5),
    p.Cancel(1),
    p.Answer(1, (b"\x00\x00\x80?", b""), "v1"),
    p.Refused(2, 503, "overloaded", "later", {"Retry-After": "1"}),
    p.StoreTask(3, "flowers", bytes(range(256)) * 4),
    p.DeleteTask(4, "flowers"),
    p.Stored(3, "v2"),
    p.Deleted(4, True),
    p.TaskChanged(7, "flowers"),
    p.Reloaded(7),
    p.EngineStatus(
        ready=True,
        startup_error=None,
        backbone=p.BackboneInfo("resnet18", "ab" * 32),
        device="cpu",
        workers=(p.WorkerInfo(0, "cpu", 99, "ready", False, 3, 1, 0, 0),),
        working_copy_bytes=10,
        device_state_bytes=0,
        device_tier=None,
        host_tier=p.TierStats(1, 100, 1000, 5, 1, 0),
        queue_depth=2,
        failed={"bad": "invalid artifact: labels"},
    ),
]


class Buffer:
    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


async def through(*messages) -> list:
    out = Buffer()
    for message in messages:
        await p.write(out, message)
    reader = asyncio.StreamReader()
    reader.feed_data(out.data)
    reader.feed_eof()
    return [await p.read(reader) for _ in messages]


async def test_every_message_arrives_as_sent():
    assert await through(*MESSAGES) == MESSAGES


def frame(head: dict) -> asyncio.StreamReader:
    data = json.dumps(head).encode()
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack("!I", 1) + struct.pack("!I", len(data)) + data)
    reader.feed_eof()
    return reader


async def test_a_message_no_class_describes_is_refused():
    with pytest.raises(ValueError, match="unknown message type"):
        await p.read(frame({"type": "os.system", "body": {}}))
    with pytest.raises(pydantic.ValidationError):  # a Submit without its rows
        await p.read(frame({"type": "Submit", "body": {"request_id": 1, "task": "a"}}))


async def test_a_peer_gone_mid_message_is_an_incomplete_read():
    out = Buffer()
    await p.write(out, MESSAGES[1])
    reader = asyncio.StreamReader()
    reader.feed_data(out.data[:-3])
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await p.read(reader)
