"""torch.compile for an engine worker: what it gains per backbone and input size (one torch
thread, batch 1 and 8, the BN-folded module as a worker runs it) and what it costs at start
(the first call at each shape compiles, with inductor's on-disk cache as the machine has it).
"""

from __future__ import annotations

import time

import torch

from bench import timing
from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.server.engine.layout import Template

WEIGHTS = {"efficientnet_lite0": None, "resnet18": "random"}
SIZES = (64, 224)
QUICK = (("resnet18", 32),)


def measure_one(name: str, size: int, seconds: float) -> list[dict]:
    torch._dynamo.reset()  # each size compiles afresh, as a worker's first batches do
    module = Template.of(load_backbone(name, WEIGHTS[name])).module
    compiled = torch.compile(module)
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            started = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - started
            # interleaved: eager, compiled, eager
            eager = timing.ms(lambda x=x: module(x), seconds, threads=1)
            fast = timing.ms(lambda x=x: compiled(x), seconds, threads=1)
            eager = (eager + timing.ms(lambda x=x: module(x), seconds, threads=1)) / 2
        rows.append(
            {
                "backbone": name,
                "size": size,
                "batch": batch,
                "compile_s": compile_s,
                "eager_ms": eager,
                "compiled_ms": fast,
            }
        )
    return rows


def measure(ctx) -> dict:
    shapes = QUICK if ctx.options.quick else [(n, s) for n in WEIGHTS for s in SIZES]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for name, size in shapes:
            rows += measure_one(name, size, 0.3 if ctx.options.quick else 1.0)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows}


def summarize(raw: dict) -> dict:
    rows = [
        [
            r["backbone"],
            r["size"],
            r["batch"],
            r["compile_s"],
            r["eager_ms"],
            r["compiled_ms"],
            r["eager_ms"] / r["compiled_ms"],
        ]
        for r in raw["rows"]
    ]
    return {"tables": {"compile": rows}}
