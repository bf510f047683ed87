"""Serving vs the raw backbone, same batch size and dtype; then latency in an open loop.

raw     the plain model in process (torch.utils.benchmark.Timer)
raw_cl  the same in channels_last (the engine's layout): layout apart from overhead
engine  one engine worker in process (BN folded), one task
http1   the server over HTTP, one task (closed loop)
http10  10 tasks chosen uniformly at random
http100 100 tasks chosen uniformly at random
Every repeat measures all six, in an order rotated per repeat; ratios are per repeat. Then
the latencies in an open loop, 1 task and 100, each at a fraction of its closed-loop rate.
"""

from __future__ import annotations

import math

import torch

from bench import fixtures, timing
from bench.bed import Bed, local_worker
from bench.stats import Spread, ratios
from piggyback_serve.masks.backbones import build_classifier
from piggyback_serve.server.engine import Row

VARIANTS = ("raw", "raw_cl", "engine", "http1", "http10", "http100")
HTTP_TASKS = {"http1": 1, "http10": 10, "http100": None}  # None: every task of the bed


def measure(bed: Bed, first: bool = False) -> dict:
    cfg, o = bed.config, bed.options
    device = torch.device(bed.device)
    x = fixtures.tensor_batch(bed.images, bed.backbone, cfg.input_size, cfg.batch).to(device)
    raw_model = build_classifier(cfg.backbone, cfg.weights).to(device).eval()
    cl_model = build_classifier(cfg.backbone, cfg.weights).to(device).eval()
    cl_model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    worker = local_worker(bed.backbone, bed.device)
    task = bed.task(0, worker)
    rows = [Row(task.key, task.state)] * cfg.batch

    def raw_step():
        with torch.inference_mode():
            raw_model(x)

    def raw_cl_step():
        with torch.inference_mode():
            cl_model(x_cl)

    steps = {"raw": raw_step, "raw_cl": raw_cl_step, "engine": lambda: worker.step(rows, x)}
    http = {k: bed.uniform(n or o.n_tasks) for k, n in HTTP_TASKS.items()}
    out: dict = {v: [] for v in VARIANTS}
    for r in range(o.repeats):
        for variant in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
            if variant in steps:
                out[variant].append(timing.rate(steps[variant], cfg.batch, o.window_s))
            else:
                out[variant].append(summary(bed.load(bed.server, http[variant], seed=r)))
    out["open_loop"] = {}
    for n, closed in ((1, "http1"), (o.n_tasks, "http100")):
        capacity = Spread.of([run["images_per_s"] for run in out[closed]]).median
        rate = max(1.0, o.load_fraction * capacity)
        runs = [
            summary(bed.open_load(bed.server, bed.uniform(n), rate, o.window_s, seed=r))
            for r in range(o.repeats)
        ]
        out["open_loop"][str(n)] = {"rate": rate, "runs": runs}
    out["clients"] = cfg.clients
    return out


def summary(result) -> dict:
    return {
        "images_per_s": result.images_per_s,
        "images_per_cpu_s": result.images / result.cpu_s if result.cpu_s else None,
        "mean_batch": result.mean_batch,
        "p50_ms": result.p(50),
        "p99_ms": result.p(99),
        "requests": result.requests,
        "errors": dict(result.errors),
    }


def rates(runs: list[dict], key: str = "images_per_s") -> list[float]:
    return [r.get(key) or math.nan for r in runs]


def ratio(serving: dict, variant: str, base: str, key: str = "images_per_cpu_s") -> Spread:
    return ratios(rates(serving[variant], key), rates(serving[base], key))


def summarize(beds: dict) -> dict:
    figures, throughput, latency = [], [], []
    for label, s in beds.items():
        for figure, variant in zip(
            (
                "serving ÷ raw, 1 task, HTTP",
                "serving ÷ raw, 10 tasks, HTTP",
                "serving ÷ raw, 100 tasks, HTTP",
            ),
            ("http1", "http10", "http100"),
            strict=True,
        ):
            figures.append({"figure": figure, "on": label, "value": ratio(s, variant, "raw_cl")})
        for variant in VARIANTS:
            runs = s[variant]
            requests = sum(r.get("requests", 0) for r in runs)
            batch = Spread.of(rates(runs, "mean_batch"))
            throughput.append(
                [
                    label,
                    s["clients"],
                    variant,
                    Spread.of(rates(runs)),
                    Spread.of(rates(runs, "images_per_cpu_s")),
                    ratio(s, variant, "raw_cl"),
                    ratio(s, variant, "raw"),
                    batch if batch.n else None,
                    requests or None,
                    sum(sum(r.get("errors", {}).values()) for r in runs),
                ]
            )
        for n, ol in s["open_loop"].items():
            runs = ol["runs"]
            latency.append(
                [
                    label,
                    int(n),
                    ol["rate"],
                    Spread.of(rates(runs)),
                    Spread.of([r["p50_ms"] for r in runs]),
                    Spread.of([r["p99_ms"] for r in runs]),
                    sum(r["requests"] for r in runs),
                    sum(sum(r["errors"].values()) for r in runs),
                ]
            )
    return {"figures": figures, "tables": {"throughput": throughput, "latency": latency}}
