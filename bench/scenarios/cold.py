"""A task the server has not served before.

In process: registering a task (parse + validate the artifact, worker.prepare: its sparse
patch of the working copy) vs one batch-1 forward of the plain module, interleaved. Over
HTTP: a task's first request vs its second, one client.
"""

from __future__ import annotations

import torch

from bench import fixtures, loadgen, timing
from bench.bed import Bed, local_worker
from bench.stats import Spread, ratios
from piggyback_serve.masks import artifact as artifacts


def measure(bed: Bed, first: bool = False) -> dict:
    cfg, o = bed.config, bed.options
    device = torch.device(bed.device)
    data = (bed.registry / f"{bed.names[0]}.safetensors").read_bytes()
    x = fixtures.tensor_batch(bed.images, bed.backbone, cfg.input_size, 1).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    worker = local_worker(bed.backbone, bed.device)
    plain = bed.backbone.module

    def register():
        worker.prepare(artifacts.load(data, bed.backbone))

    def forward():
        with torch.inference_mode():
            plain(x)

    reg, fwd = [], []
    for _ in range(o.cold_repeats):  # interleaved: a busy machine slows both alike
        reg.append(timing.ms(register, 0.1))
        fwd.append(timing.ms(forward, 0.1))
    port = bed.server.port
    cold_ms, warm_ms = [], []
    for target in bed.names[-o.cold_repeats :]:  # never asked for before
        cold_ms.append(one(port, bed.predict(target)))
        warm_ms.append(one(port, bed.predict(target)))
    return {
        "register_ms": reg,
        "forward_b1_ms": fwd,
        "first_request_ms": cold_ms,
        "second_request_ms": warm_ms,
    }


def one(port: int, request: loadgen.Request) -> float:
    """Latency in ms of a single request on a fresh connection."""
    result = loadgen.run(port, lambda rng: request, clients=1, max_requests=1, max_seconds=60)
    if result.errors or not result.latencies_s:
        raise RuntimeError(f"request failed: {result.errors}")
    return result.p(50)


def summarize(beds: dict) -> dict:
    figures, rows = [], []
    for label, c in beds.items():
        reg = ratios(c["register_ms"], c["forward_b1_ms"])
        figures.append(
            {
                "figure": "register a task (parse + validate + prepare) ÷ batch-1 forward",
                "on": label,
                "value": reg,
            }
        )
        rows.append(
            [
                label,
                Spread.of(c["register_ms"]),
                Spread.of(c["forward_b1_ms"]),
                reg,
                Spread.of(c["first_request_ms"]),
                Spread.of(c["second_request_ms"]),
                ratios(c["first_request_ms"], c["second_request_ms"]),
            ]
        )
    return {"figures": figures, "tables": {"cold": rows}}
