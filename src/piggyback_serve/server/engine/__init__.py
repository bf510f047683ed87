"""The engine: the workers that own the device and the pool that feeds them.

config.py (a worker's settings) · placement.py (workers, threads) · fold.py (BatchNorm
folded) · layout.py (what workers share) · working_copy.py · task_state.py · geometry.py ·
mixed.py (one-pass mixed batches) · worker.py (one device: step(batch) -> probabilities) ·
process.py (a worker's process loop) · pool.py (the workers, as the batcher sees them).
"""

from piggyback_serve.server.engine.pool import BatchError, EnginePool, Undecodable, WorkerDied
from piggyback_serve.server.engine.worker import Row, TaskKey, Worker
from piggyback_serve.server.protocol import WorkerInfo

__all__ = [
    "BatchError",
    "EnginePool",
    "Row",
    "TaskKey",
    "Undecodable",
    "Worker",
    "WorkerDied",
    "WorkerInfo",
]
