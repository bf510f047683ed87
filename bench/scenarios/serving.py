"""Scenario 1: serving vs the raw backbone, same batch size and dtype.

raw     the plain model in a tight in-process loop
raw_cl  the same in channels_last (what our engine runs), to separate layout from overhead
engine  one engine worker in-process (BN folded), one task (the working copy patched to it)
http1   the server over HTTP, one task
http10  10 tasks chosen uniformly at random
http100 100 tasks chosen uniformly at random (no cache: every task is a sparse patch)
Every repeat measures all six, in an order rotated per repeat; ratios are per repeat.
"""

from __future__ import annotations

import time

import torch

from bench import fixtures
from bench.bed import Bed, local_worker, sync
from piggyback_serve.masks.backbones import build_classifier
from piggyback_serve.server.engine import Row

VARIANTS = ("raw", "raw_cl", "engine", "http1", "http10", "http100")


def loop_rate(step, images_per_step: int, seconds: float, device: str, max_steps: int) -> dict:
    """Images per second (and per CPU second) of `step()` called back to back."""
    step()  # warm
    sync(device)
    started, cpu = time.perf_counter(), time.process_time()
    steps = 0
    while steps < max_steps and time.perf_counter() - started < seconds:
        step()
        steps += 1
    sync(device)
    images = steps * images_per_step
    return {
        "images_per_s": images / (time.perf_counter() - started),
        "images_per_cpu_s": images / max(time.process_time() - cpu, 1e-9),
    }


def run(bed: Bed) -> dict:
    cfg, o = bed.config, bed.options
    device = torch.device(bed.device)
    x = fixtures.tensor_batch(bed.images, bed.backbone, cfg.input_size, cfg.batch).to(device)
    raw_model = build_classifier(cfg.backbone, cfg.weights).to(device)
    cl_model = build_classifier(cfg.backbone, cfg.weights).to(device)
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

    def engine_step():
        worker.step(rows, x)

    http = {"http1": bed.uniform(1), "http10": bed.uniform(10), "http100": bed.uniform(o.n_tasks)}
    steps = {"raw": raw_step, "raw_cl": raw_cl_step, "engine": engine_step}
    out: dict = {v: [] for v in VARIANTS}
    for r in range(o.repeats):
        for variant in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
            if variant in steps:
                rate = loop_rate(steps[variant], cfg.batch, o.window_s, bed.device, o.max_requests)
                out[variant].append(rate)
            else:
                out[variant].append(summary(bed.load(bed.server, http[variant], seed=r)))
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
