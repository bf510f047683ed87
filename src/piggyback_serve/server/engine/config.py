"""What one engine worker is told when it starts: frozen values, picklable (no globals)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerConfig:
    index: int  # the worker's number in the pool, 0-based
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "float16", "bfloat16"
    threads: int  # torch intra-op threads
    one_pass: bool  # mixed batches in one pass (server/engine/mixed.py) rather than per task
    compile: bool = False  # torch.compile the module (the working copy stays its parameters)
    # Device copies of task states kept (bytes; CUDA or a dtype other than float32);
    # None: a quarter of the device's free memory when the worker starts.
    device_state_bytes: int | None = None
