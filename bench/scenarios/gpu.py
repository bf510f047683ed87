"""The engine's in-process figures on CUDA, at larger batches, and the HTTP path: our server
with one engine worker per device, one task, 8 clients.

Task switch ÷ batch-1 forward, engine ÷ plain module (one task), and mixed batches (1, 2,
4, 8 tasks) run per task and in one pass (the way chosen per layer, forced to corrections,
forced to segments): which of per-task and one-pass wins on the card is what
`PIGGY_MIXED_BATCHES=auto` should pick there. Bounded: well under 10 minutes on one GPU.
On the CPU with --quick it runs the same code paths in seconds (tests/bench does).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench import fixtures
from bench.fixtures import Config
from bench.scenarios import multitask, workers
from bench.stats import Spread

BATCH = 64


def configs(quick: bool) -> list[Config]:
    if quick:
        return [Config("resnet18", "random", 32, 4, 4)]
    return [
        Config("efficientnet_lite0", None, 64, BATCH, BATCH),
        Config("resnet18", "random", 64, BATCH, BATCH),
    ]


def measure(ctx) -> dict:
    o = ctx.options
    repeats, window = (1, 0.2) if o.quick else (o.repeats, o.window_s)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="piggy-gpu-") as tmp:
        for cfg in configs(o.quick):
            backbone = fixtures.backbone_for(cfg)
            b = multitask.Bench(cfg, backbone, Path(tmp) / cfg.backbone, 8, ctx.device)
            try:
                ip = multitask.in_process(b, repeats, window, batch=cfg.batch)
            finally:
                b.close()
            http = workers.serving(cfg, backbone, Path(tmp), repeats, window, ctx.device)
            results[cfg.label] = {"in_process": ip, "http_workers": http}
    return results


def summarize(results: dict) -> dict:
    figs, mixed, http = [], [], []
    for label, bed in results.items():
        found = multitask.figures({"in_process": bed["in_process"]})
        figs += [{"figure": f, "on": label, "value": v} for f, v in found.items()]
        mixed += multitask.mixed_rows(label, bed["in_process"]["mixed"])[0]
        srv = bed["http_workers"]["server"]
        http.append(
            [
                label,
                Spread.of([r["images_per_s"] for r in srv]),
                Spread.of([r["p50_ms"] for r in srv]),
                sum(sum(r["errors"].values()) for r in srv),
            ]
        )
    return {"figures": figs, "tables": {"mixed": mixed, "http": http}}
