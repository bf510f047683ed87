"""In-process timing through torch.utils.benchmark.Timer.

On a shared CPU host wall time mostly measures the other tenants, so every figure is also
taken in CPU seconds of this process (Timer with `time.process_time`); Timer's default
clock synchronises CUDA where there is a device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def _median_s(fn: Callable[[], object], seconds: float, threads: int, cpu: bool) -> float:
    kw = {"timer": time.process_time} if cpu else {}
    t = Timer("fn()", globals={"fn": fn}, num_threads=threads, **kw)
    return t.blocked_autorange(min_run_time=seconds).median


def _on_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def rate(fn: Callable[[], object], images: int, seconds: float, threads: int | None = None) -> dict:
    """Images per second and per CPU second of `fn()`, which handles `images` per call
    (half of `seconds` on each clock, after one warm call)."""
    threads = threads or torch.get_num_threads()
    fn()
    wall = _median_s(fn, seconds / 2, threads, cpu=False)
    cpu = _median_s(fn, seconds / 2, threads, cpu=True)
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu}


def ms(fn: Callable[[], object], seconds: float = 0.2, threads: int | None = None) -> float:
    """Median milliseconds per call: CPU time of this process on the CPU, wall on CUDA."""
    threads = threads or torch.get_num_threads()
    fn()
    return 1e3 * _median_s(fn, seconds, threads, cpu=not _on_cuda())
