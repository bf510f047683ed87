"""Where the engine workers run: devices x workers, and torch threads each, decided once
before anything starts.

On the CPU, one worker per core with one torch thread each: intra-op threads waste small
batches (64 px batch 8 took 12.9 ms on one thread and 14.7 ms on two, EfficientNet-Lite0),
while a worker per core keeps every core on its own batch. On CUDA, one worker per device.
"""

from __future__ import annotations

import os

import torch

from piggyback_serve.masks.device import resolve_device
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.settings import Settings


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the whole machine's)."""
    return len(os.sched_getaffinity(0))


def place(settings: Settings) -> list[WorkerConfig]:
    """One WorkerConfig per engine worker."""
    device = resolve_device(settings.device)
    mode = settings.mixed_batches
    if mode == "auto":
        mode = "per-task" if device.type == "cpu" else "one-pass"
    if device.type == "cuda":
        count = torch.cuda.device_count() if settings.device == "auto" else 1
        first = 0 if device.index is None else device.index
        devices = [f"cuda:{first + i}" for i in range(count)]
    else:
        devices = ["cpu"] * (settings.engine_workers or available_cores())
    return [
        WorkerConfig(
            index=i,
            device=name,
            dtype=settings.dtype,
            threads=settings.engine_threads,
            one_pass=mode == "one-pass",
            compile=settings.compile,
            device_state_bytes=settings.device_state_bytes,
        )
        for i, name in enumerate(devices)
    ]


def frontend_count(settings: Settings) -> int:
    """HTTP front-end processes: PIGGY_FRONTENDS, else enough to feed the device. On CUDA
    the engine needs a core per device and the service one: the other cores decode. On the
    CPU the engine workers take every core already: one front end, in the same process as
    the engine (`python -m bench --scenarios frontends` compares)."""
    if settings.frontends is not None:
        return settings.frontends
    if resolve_device(settings.device).type != "cuda":
        return 1
    return max(1, available_cores() - len(place(settings)) - 1)
