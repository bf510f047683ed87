"""Scenario 3: a task the server has not seen.

In-process: registering a task (parse + validate the artifact, worker.prepare: its sparse
patch of the working copy) vs one batch-1 forward of the plain module, interleaved.
Over HTTP: the first request to a task vs the next one to it (there is no weight cache:
both run the same patch; the difference is what a first request still costs).
"""

from __future__ import annotations

import time

import torch

from bench import fixtures, loadgen
from bench.bed import Bed, local_worker, sync
from piggyback_serve.masks import artifact as artifacts


def _timed(fn, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def run(bed: Bed) -> dict:
    cfg, o = bed.config, bed.options
    device = torch.device(bed.device)
    data = (bed.registry / f"{bed.names[0]}.safetensors").read_bytes()
    x = fixtures.tensor_batch(bed.images, bed.backbone, cfg.input_size, 1).to(device)
    worker = local_worker(bed.backbone, bed.device)
    plain = bed.backbone.module
    x = x.contiguous(memory_format=torch.channels_last)

    def register():
        worker.prepare(artifacts.load(data, bed.backbone))

    def forward():
        with torch.inference_mode():
            plain(x)

    register()
    forward()
    reg, fwd = [], []
    for _ in range(o.cold_repeats):
        reg.append(_timed(register, bed.device))
        fwd.append(_timed(forward, bed.device))

    # Over HTTP: each target (never asked for yet) once, then again.
    port = bed.server.port
    targets = bed.names[-o.cold_repeats :]
    cold_ms, warm_ms = [], []
    for target in targets:
        cold_ms.append(one(port, bed.predict(target)))
        warm_ms.append(one(port, bed.predict(target)))
    return {
        "register_ms": [1000 * t for t in reg],
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
