"""Scenario 3: a cold task.

In-process: materialising a task's masked weights from its packed bits (what the engine
does on a cache miss) vs one batch-1 forward of that task, interleaved.
Over HTTP: the first request to a task that is not in the cache vs the next one to it.
"""

from __future__ import annotations

import time

import torch

from bench import fixtures, loadgen
from bench.bed import Bed, sync
from masks import inference


def _timed(fn, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def run(bed: Bed) -> dict:
    cfg, o = bed.config, bed.options
    device = torch.device(bed.device)
    art = bed.artifact(0)
    x = fixtures.tensor_batch(bed.images, bed.backbone, cfg.input_size, 1).to(device)
    params = inference.materialise(art, bed.backbone, device)

    def materialise():
        with torch.inference_mode():
            inference.materialise(art, bed.backbone, device)

    def forward():
        with torch.inference_mode():
            inference.forward(bed.backbone, params, x)

    materialise()
    forward()
    mat, fwd = [], []
    for _ in range(o.cold_repeats):
        mat.append(_timed(materialise, bed.device))
        fwd.append(_timed(forward, bed.device))

    # Over HTTP. The server's LRU holds exactly `cache_tasks` tasks: fill it with the
    # first ones, then each target (never asked for since) is cold once, warm next time.
    port = bed.server.port
    for name in bed.names[: o.cache_tasks]:
        one(port, bed.predict(name))
    targets = bed.names[o.cache_tasks :][-o.cold_repeats :]
    cold_ms, warm_ms = [], []
    for target in targets:
        cold_ms.append(one(port, bed.predict(target)))
        warm_ms.append(one(port, bed.predict(target)))
    return {
        "materialise_ms": [1000 * t for t in mat],
        "forward_b1_ms": [1000 * t for t in fwd],
        "first_request_cold_ms": cold_ms,
        "first_request_warm_ms": warm_ms,
        "params_bytes": bed.params_bytes,
    }


def one(port: int, request: loadgen.Request) -> float:
    """Latency in ms of a single request on a fresh connection."""
    result = loadgen.run(port, lambda rng: request, clients=1, max_requests=1, max_seconds=60)
    if result.errors or not result.latencies_s:
        raise RuntimeError(f"request failed: {result.errors}")
    return result.p(50)
