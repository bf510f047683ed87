"""503 answers are retried with backoff, honouring Retry-After (no server needed)."""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

from piggyback_serve.client import AsyncClient, Client, Retry
from piggyback_serve.client.client import retry_after
from piggyback_serve.client.errors import Unavailable

OK = {
    "task": "t",
    "results": [{"top": [{"label": "a", "index": 0, "score": 1.0}]}],
    "latency_ms": 1,
}
BUSY = {"error": {"code": "overloaded", "message": "queue full"}}


def flaky(busy: int, headers: dict[str, str]):
    """A transport answering 503 `busy` times, then 200; records when each request came."""
    seen: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        if len(seen) <= busy:
            return httpx.Response(503, json=BUSY, headers=headers)
        return httpx.Response(200, json=OK)

    return handler, seen


def test_retry_after_is_honoured():
    handler, seen = flaky(2, {"Retry-After": "0.2"})
    with Client("http://x", transport=httpx.MockTransport(handler)) as c:
        assert c.predict("t", b"img").results[0].label == "a"
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert len(seen) == 3 and all(0.18 <= g < 1.0 for g in gaps), gaps


def test_backoff_without_retry_after_then_give_up():
    handler, seen = flaky(10, {})
    retry = Retry(attempts=3, backoff_s=0.05)
    transport = httpx.MockTransport(handler)
    with (
        Client("http://x", transport=transport, retry=retry) as c,
        pytest.raises(Unavailable) as info,
    ):
        c.tasks()
    assert len(seen) == 3 and info.value.code == "overloaded" and info.value.message == "queue full"
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert 0.025 <= gaps[0] < 0.5 and 0.05 <= gaps[1] < 0.5  # 0.05 then 0.1, times jitter


def test_retry_after_capped_and_health_not_retried():
    handler, seen = flaky(1, {"Retry-After": "3600"})
    retry = Retry(max_wait_s=0.05)
    with Client("http://x", transport=httpx.MockTransport(handler), retry=retry) as c:
        started = time.monotonic()
        c.predict("t", b"img")
        assert time.monotonic() - started < 1
        seen.clear()
        with pytest.raises(Unavailable) as info:
            c.health()  # "not ready" is the answer, not a reason to wait
    assert len(seen) == 1 and info.value.retry_after == 3600


def test_async_client_retries_too():
    handler, seen = flaky(2, {"Retry-After": "0"})

    async def main():
        async with AsyncClient("http://x", transport=httpx.MockTransport(handler)) as c:
            return await c.predict("t", [b"a"])

    assert asyncio.run(main()).task == "t" and len(seen) == 3


def test_retry_after_forms():
    def parsed(value: str) -> float | None:
        return retry_after(httpx.Response(503, headers={"Retry-After": value}))

    assert parsed("2") == 2.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parsed(later) <= 30
    assert parsed("soon") is None
