"""Bounded HTTP/1.1 load generators on loopback: an open loop and a closed loop.

Open loop (`open_loop`, for latency): requests leave at a fixed arrival rate whatever the
server does, and each latency counts from the request's scheduled time, so a slow answer
cannot hold back the next requests and hide the tail.
Closed loop (`closed_loop`, for throughput): `clients` connections each send one request,
wait for its answer, and send the next. Both stop at `max_requests` or after their time.
They speak just enough HTTP/1.1 (keep-alive, Content-Length or chunked answers) to cost
the machine far less than an HTTP library would: on 2 cores the client shares the CPU
with the server it measures, and every side of a comparison gets the same client.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.stats import percentile


@dataclass(frozen=True)
class Request:
    """One prepared HTTP request: the bytes on the wire are built once."""

    wire: bytes
    tag: str = ""  # groups latencies (e.g. the task, hot or cold)
    images: int = 1

    @classmethod
    def post(
        cls,
        path: str,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        tag: str = "",
        images: int = 1,
    ) -> Request:
        lines = [
            f"POST {path} HTTP/1.1",
            "Host: 127.0.0.1",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        return cls(("\r\n".join(lines) + "\r\n\r\n").encode() + body, tag, images)


def multipart(field_name: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


@dataclass
class LoadResult:
    """What one closed-loop run measured (errors are answers other than 200)."""

    elapsed_s: float = 0.0
    images: int = 0
    latencies_s: list[float] = field(default_factory=list)
    by_tag: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float | None = None  # the server's CPU seconds meanwhile, when the caller knows
    mean_batch: float | None = None  # images per engine batch meanwhile (our server only)

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    def check(self) -> LoadResult:
        """This result, unless no request was answered 200 (a broken side, not a figure)."""
        if not self.latencies_s and self.errors:
            raise HttpError(f"no request answered 200: {self.errors}")
        return self

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s else 0.0

    def p(self, q: float, tag: str | None = None) -> float:
        """Latency percentile in milliseconds (of one tag's requests when given)."""
        values = self.latencies_s if tag is None else self.by_tag.get(tag, [])
        return 1000 * percentile(values, q)


class HttpError(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, bytes(body)
            body += chunk[:-2]
    raise HttpError(f"answer without a length: {lines[0]}")


async def closed_loop(
    port: int,
    choose: Callable[[random.Random], Request],
    clients: int,
    max_requests: int,
    max_seconds: float,
    seed: int = 0,
    request_timeout_s: float = 60.0,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Run the loop; `choose` picks each next request (it gets a seeded Random)."""
    result = LoadResult()
    rng = random.Random(seed)
    sent = 0
    started = time.perf_counter()
    deadline = started + max_seconds
    last_done = started

    async def client() -> None:
        nonlocal sent, last_done
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                request = choose(rng)
                t0 = time.perf_counter()
                writer.write(request.wire)
                try:
                    status, _ = await asyncio.wait_for(_read_response(reader), request_timeout_s)
                except (
                    TimeoutError,
                    asyncio.IncompleteReadError,
                    ConnectionError,
                    HttpError,
                ) as exc:
                    key = type(exc).__name__
                    result.errors[key] = result.errors.get(key, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                t1 = time.perf_counter()
                if status != 200:
                    result.errors[str(status)] = result.errors.get(str(status), 0) + 1
                    continue
                result.latencies_s.append(t1 - t0)
                result.by_tag.setdefault(request.tag, []).append(t1 - t0)
                result.images += request.images
                last_done = max(last_done, t1)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    result.elapsed_s = last_done - started
    return result


async def open_loop(
    port: int,
    choose: Callable[[random.Random], Request],
    rate: float,
    seconds: float,
    max_requests: int = 100_000,
    seed: int = 0,
    request_timeout_s: float = 60.0,
    max_connections: int = 256,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Send `rate` requests per second for `seconds`, each on an idle keep-alive connection
    (a new one when none is idle, at most `max_connections`); latency from the schedule."""
    result = LoadResult()
    rng = random.Random(seed)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    gate = asyncio.Semaphore(max_connections)
    started = time.perf_counter()
    last_done = started

    def failed(key: str) -> None:
        result.errors[key] = result.errors.get(key, 0) + 1

    async def one(request: Request, scheduled: float) -> None:
        nonlocal last_done
        async with gate:
            reader, writer = idle.pop() if idle else await asyncio.open_connection(host, port)
            writer.write(request.wire)
            try:
                status, _ = await asyncio.wait_for(_read_response(reader), request_timeout_s)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, HttpError) as exc:
                failed(type(exc).__name__)
                writer.close()
                return
            done = time.perf_counter()
            idle.append((reader, writer))
        if status != 200:
            failed(str(status))
            return
        result.latencies_s.append(done - scheduled)
        result.by_tag.setdefault(request.tag, []).append(done - scheduled)
        result.images += request.images
        last_done = max(last_done, done)

    pending = []
    for i in range(min(max_requests, max(1, int(rate * seconds)))):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(choose(rng), scheduled)))
    await asyncio.gather(*pending)
    for _, writer in idle:
        writer.close()
    result.elapsed_s = max(last_done - started, seconds)
    return result


def run_open(port: int, choose, rate: float, seconds: float, **kw) -> LoadResult:
    """open_loop from synchronous code."""
    return asyncio.run(open_loop(port, choose, rate, seconds, **kw))


def run(port: int, choose, clients: int, max_requests: int, max_seconds: float, **kw) -> LoadResult:
    """closed_loop from synchronous code."""
    return asyncio.run(closed_loop(port, choose, clients, max_requests, max_seconds, **kw))
