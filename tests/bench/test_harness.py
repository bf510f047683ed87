"""The benchmark harness itself, fast: the load generator stays in its bounds, and the
RESULTS.md writer puts the summary table with every issue's figure names first."""

from __future__ import annotations

import asyncio
import time

from bench import artifact_size, loadgen, report
from bench.stats import Spread, percentile, ratios


async def _serve(chunked: bool = False, delay_s: float = 0.0):
    """A tiny keep-alive HTTP/1.1 server answering every request with 200."""
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
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
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


def _runs(rate: float, **extra) -> list[dict]:
    return [
        {
            "images_per_s": rate * k,
            "images_per_cpu_s": rate * k,
            "p50_ms": 10.0,
            "p99_ms": 20.0,
            "requests": 10,
            "errors": {},
            **extra,
        }
        for k in (0.9, 1.0, 1.1)
    ]


def fake_results() -> dict:
    serving = {
        v: _runs(r)
        for v, r in (("raw", 100), ("engine", 99), ("http1", 96), ("http10", 92), ("http100", 40))
    }
    serving["raw"] = [
        {"images_per_s": r["images_per_s"], "images_per_cpu_s": r["images_per_s"]}
        for r in serving["raw"]
    ]
    return {
        "meta": {"date": "today", "device": "cpu", "command": "python -m bench", "load": "x"},
        "beds": {
            "efficientnet_lite0 224px b8": {
                "config": {"clients": 16},
                "serving": serving,
                "bytes": {
                    "backbone": "efficientnet_lite0",
                    "maskable_weights": 8,
                    "ideal_bytes": 100,
                    "file_bytes": 101,
                    "ratio": 1.01,
                    "full_copy_bytes": 800,
                },
                "cold": {
                    "register_ms": [1, 2, 3],
                    "forward_b1_ms": [4, 4, 4],
                    "first_request_cold_ms": [5, 6, 7],
                    "first_request_warm_ms": [5, 5, 5],
                },
            }
        },
        "peers": {
            "runs": {"ours100": _runs(30), "ray100": _runs(10)},
            "copy_file_bytes": 1,
            "max_models": 10,
            "cache_bytes": 10,
        },
        "skipped": [],
    }


def test_results_start_with_the_summary_table_and_its_figures(multitask_http):
    results = fake_results()
    results["multitask"] = {"beds": {"resnet18 64px b8": {"http": multitask_http}}}
    results["artifact"] = {"figures": {artifact_size.ROW_BITS: 0.2}, "tasks": []}
    text = report.render(results, ["serving_ratio.png"])
    lines = text.splitlines()
    assert lines[0] == "| figure | goal | value |" and lines[1] == "| --- | --- | --- |"
    rows = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in lines[2:16]]
    assert [r[0] for r in rows[:5]] == [
        "serving ÷ raw, 1 task, HTTP (efficientnet_lite0 224px b8)",
        "serving ÷ raw, 10 tasks, HTTP (efficientnet_lite0 224px b8)",
        "serving ÷ raw, 100 tasks, HTTP (efficientnet_lite0 224px b8)",
        "register a task (parse + validate + engine.prepare) ÷ batch-1 forward",
        "ours ÷ Ray Serve multiplex, 100 tasks",
    ]
    assert [r[2] for r in rows[:5]] == ["0.960", "0.920", "0.400", "0.500", "3.000"]
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["many ÷ one task, 200 tasks, HTTP (resnet18 64px b8)"] == ["≥ 0.80", "0.850"]
    assert by_name["task switch ÷ batch-1 forward (resnet18 64px b8)"][1] == "not measured"
    assert by_name[artifact_size.ROW_BITS] == ["≤ 0.25", "0.200"]
    assert by_name[artifact_size.ROW_ENTROPY] == ["≤ 1.3", "not measured"]
    assert "## 6. Many tasks at the speed of one" in text
    assert "![serving_ratio.png](serving_ratio.png)" in text


def test_a_figure_not_measured_says_so():
    results = fake_results()
    del results["peers"]
    text = report.render(results, [])
    assert "| ours ÷ Ray Serve multiplex, 100 tasks | ≥ 3 (CPU) | not measured |" in text


def test_plots_are_written(tmp_path):
    made = report.plots(fake_results(), tmp_path)
    assert "serving_ratio.png" in made and "peers.png" in made
    assert all((tmp_path / name).stat().st_size < 200_000 for name in made)
