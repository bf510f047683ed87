"""The Open Inference Protocol over gRPC against REST /predict: the same 64 px images (JPEG
and PNG, one per request) sent by the same number of concurrent clients, in windows
that alternate between the two sides within one server process; each window counts the
images answered and the CPU seconds the whole server tree (front end and engine workers)
spent, read with psutil. The ratio, per repeat, is gRPC's images per server CPU-second over
REST's: what a request costs the server on each transport, the classify step being one.

resnet18 (random weights, seeded) at 64 px, one synthetic task; REST through httpx (raw
image/jpeg or image/png body), gRPC through tritonclient.grpc.aio (BYTES input, top_k 5).
Every window is bounded by its time and by a request count.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from bench import fixtures, procs
from bench.stats import Spread, percentile, ratios
from piggyback_serve.masks.backbones import load_backbone

BACKBONE, WEIGHTS, SIZE = "resnet18", "random", 64
SIDES = ("rest", "grpc")
FULL = {"repeats": 5, "window_s": 4.0, "warmup_s": 1.0, "clients": 8, "max_requests": 20000}
QUICK = {"repeats": 2, "window_s": 1.0, "warmup_s": 0.3, "clients": 4, "max_requests": 2000}
READY_TIMEOUT_S = 180


def images() -> list[tuple[bytes, str]]:
    """The bench's 64 px photos as JPEG, and the same photos as PNG."""
    out = []
    for jpeg in fixtures.jpegs(SIZE, 4):
        out.append((jpeg, "image/jpeg"))
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
        out.append((buf.getvalue(), "image/png"))
    return out


def measure(ctx) -> dict:
    plan = QUICK if ctx.options.quick else FULL
    folder = ctx.workdir / "oip_grpc" / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    (task,) = fixtures.write_registry(folder, load_backbone(BACKBONE, WEIGHTS), 1, SIZE)
    grpc_port = procs.free_port()
    server = procs.start_ours(
        ctx.workdir,
        folder,
        BACKBONE,
        WEIGHTS,
        16,
        tag="oip-grpc",
        extra_env={"PIGGY_DEVICE": ctx.device, "PIGGY_GRPC_PORT": str(grpc_port)},
    )
    try:
        server.wait_ready("/readyz", READY_TIMEOUT_S)
        runs = asyncio.run(_measure(server, grpc_port, task, plan))
    finally:
        server.stop()
    return {"backbone": BACKBONE, "input_size": SIZE, "plan": plan, "runs": runs}


async def _measure(server: procs.Proc, grpc_port: int, task: str, plan: dict) -> list[dict]:
    import tritonclient.grpc.aio as grpcclient

    payloads = images()
    limits = httpx.Limits(max_connections=plan["clients"])
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    async with httpx.AsyncClient(base_url=server.url(""), limits=limits, timeout=60) as http:

        async def rest(i: int) -> None:
            data, content_type = payloads[i % len(payloads)]
            r = await http.post(
                "/predict",
                params={"task": task, "top_k": 5},
                content=data,
                headers={"content-type": content_type},
            )
            r.raise_for_status()

        async def grpc(i: int) -> None:
            tensor = grpcclient.InferInput("image", [1], "BYTES")
            data = payloads[i % len(payloads)][0]
            tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
            await triton.infer(task, [tensor], parameters={"top_k": 5})

        send = {"rest": rest, "grpc": grpc}
        for side in SIDES:  # warm both paths (connections, the task's state)
            await _window(server, send[side], plan["clients"], plan["warmup_s"], 200)
        runs = []
        for r in range(plan["repeats"]):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for side in order:
                run = await _window(
                    server, send[side], plan["clients"], plan["window_s"], plan["max_requests"]
                )
                runs.append({"side": side, "repeat": r, **run})
    await triton.close()
    return runs


async def _window(server: procs.Proc, send, clients: int, window_s: float, max_requests: int):
    """`clients` closed loops for `window_s` or `max_requests` requests, whichever first."""
    latencies: list[float] = []
    sent = 0
    deadline = time.perf_counter() + window_s

    async def loop() -> None:
        nonlocal sent
        while time.perf_counter() < deadline and sent < max_requests:
            i = sent
            sent += 1
            t0 = time.perf_counter()
            await send(i)
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = server.cpu_s(children=True), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    wall, cpu = time.perf_counter() - t0, server.cpu_s(children=True) - cpu0
    n = len(latencies)
    return {
        "images": n,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "images_per_s": n / wall,
        "images_per_cpu_s": n / cpu if cpu else float("nan"),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def summarize(raw: dict) -> dict:
    by_side = {s: [r for r in raw["runs"] if r["side"] == s] for s in SIDES}
    clients = raw["plan"]["clients"]
    on = f"{raw['backbone']} {raw['input_size']} px, 1 image per request, {clients} clients"
    figures = [
        {
            "figure": "gRPC ÷ REST, images per server CPU-second, 64 px",
            "on": on,
            "value": ratios(
                [r["images_per_cpu_s"] for r in by_side["grpc"]],
                [r["images_per_cpu_s"] for r in by_side["rest"]],
            ),
        }
    ]
    rows = []
    for side, runs in by_side.items():
        rows.append(
            [
                {"rest": "REST POST /predict", "grpc": "gRPC ModelInfer"}[side],
                sum(r["images"] for r in runs),
                Spread.of([r["images_per_s"] for r in runs]),
                Spread.of([r["images_per_cpu_s"] for r in runs]),
                statistics.median(r["p50_ms"] for r in runs),
                statistics.median(r["p99_ms"] for r in runs),
            ]
        )
    return {"figures": figures, "tables": {"sides": rows}}
