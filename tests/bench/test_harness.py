"""The benchmark harness itself, fast: the load generators stay in their bounds, the open
loop keeps its arrival rate whatever the server does, Timer-based rates, small stats."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from bench import loadgen, timing
from bench.stats import Spread, percentile, ratios


async def _serve(chunked: bool = False, delay_s: float = 0.0, status: int = 200):
    """A tiny keep-alive HTTP/1.1 server answering every request with `status`."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                await asyncio.sleep(delay_s)
                served += 1
                if chunked:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n"
                    )
                else:
                    writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], lambda: served


def _request(tag: str = "a") -> loadgen.Request:
    return loadgen.Request.post("/predict?task=x", b"\xff\xd8jpeg", "image/jpeg", tag=tag)


def test_load_generator_stops_at_the_request_bound():
    async def main():
        server, port, served = await _serve()
        async with server:
            result = await loadgen.closed_loop(
                port,
                lambda rng: _request(rng.choice("ab")),
                clients=4,
                max_requests=25,
                max_seconds=30,
            )
        return result, served()

    result, served = asyncio.run(main())
    assert result.requests == served == 25
    assert result.images == 25 and not result.errors
    assert set(result.by_tag) <= {"a", "b"} and sum(map(len, result.by_tag.values())) == 25
    assert 0 < result.p(50) <= result.p(99)


def test_load_generator_stops_at_the_time_bound_and_reads_chunked_answers():
    async def main():
        server, port, _ = await _serve(chunked=True, delay_s=0.01)
        async with server:
            started = time.perf_counter()
            result = await loadgen.closed_loop(
                port, lambda rng: _request(), clients=2, max_requests=10**9, max_seconds=0.3
            )
            return result, time.perf_counter() - started

    result, took = asyncio.run(main())
    assert took < 3
    assert 2 <= result.requests < 200 and not result.errors
    assert result.images_per_s > 0


def test_a_side_that_answers_no_200_is_not_a_figure():
    async def main():
        server, port, _ = await _serve(status=500)
        async with server:
            return await loadgen.closed_loop(port, lambda rng: _request(), 2, 6, 30)

    result = asyncio.run(main())
    assert result.errors == {"500": 6}
    with pytest.raises(loadgen.HttpError, match="no request answered 200"):
        result.check()


def test_multipart_body_carries_the_file():
    body, ctype = loadgen.multipart("file", "a.jpg", b"DATA", "image/jpeg")
    boundary = ctype.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and b"\r\n\r\nDATA\r\n" in body
    assert body.endswith(f"--{boundary}--\r\n".encode())


def test_stats():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert ratios([2, 4], [1, 2]).median == 2
    assert Spread.of([]).fmt() == "n/a"


def test_open_loop_keeps_its_rate_and_counts_latency_from_the_schedule():
    async def main():
        server, port, served = await _serve(delay_s=0.2)  # slower than the arrivals
        async with server:
            started = time.perf_counter()
            result = await loadgen.open_loop(port, lambda rng: _request(), rate=50, seconds=0.4)
            return result, served(), time.perf_counter() - started

    result, served, took = asyncio.run(main())
    assert result.requests == served == 20 and not result.errors
    assert took < 3
    # a closed loop of one client would have sent 2; the open loop sent them all on time,
    # and the last one's latency includes no wait for the first ones
    assert 0.19 < result.p(50) / 1000 < 1.0


def test_timer_rates_are_per_image():
    x = torch.randn(64, 64)
    found = timing.rate(lambda: x @ x, images=8, seconds=0.1, threads=1)
    assert found["images_per_s"] > 0 and found["images_per_cpu_s"] > 0
    assert timing.ms(lambda: x @ x, 0.05, threads=1) > 0
