"""The loop of one engine worker process: messages in from the pool, answers out.

Messages (server/protocol.py), over one pipe: RunBatch, Forget, DropArena, Stop in; Ready
or StartFailed once at start, then BatchDone or BatchFailed per batch out. A batch's pixels
are read from the front ends' shared-memory arenas (server/arena.py).
"""

from __future__ import annotations

import os
import signal

import torch

from piggyback_serve.server.arena import ArenaReader
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.layout import Template
from piggyback_serve.server.engine.worker import Row, Worker
from piggyback_serve.server.protocol import (
    BatchDone,
    BatchFailed,
    DropArena,
    Forget,
    Ready,
    RunBatch,
    StartFailed,
    Stop,
    WorkerReport,
    probs_to_bytes,
)


def main(conn, config: WorkerConfig, template: Template) -> None:
    # Signals are the server's to handle: it drains, then closes the pipe or says stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(config.threads)
    try:
        worker = Worker(config, template)
    except Exception as exc:
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}"))
        return
    del template
    conn.send(Ready(os.getpid()))
    states = {}
    arenas = ArenaReader()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        match message:
            case Stop():
                return
            case Forget(keys):
                for key in keys:
                    states.pop(key, None)
                worker.forget(list(keys))
            case DropArena(name):
                arenas.drop(name)
            case RunBatch(batch_id, keys, new_states, refs):
                states.update(new_states)
                try:
                    pixels = _on_host(arenas.stack(list(refs)), worker)
                    probs = worker.step([Row(key, states[key]) for key in keys], pixels)
                except Exception as exc:
                    why = f"{type(exc).__name__}: {exc}"
                    conn.send(BatchFailed(batch_id, why, _report(worker)))
                    continue
                conn.send(BatchDone(batch_id, tuple(map(probs_to_bytes, probs)), _report(worker)))


def _on_host(pixels: torch.Tensor, worker: Worker) -> torch.Tensor:
    if worker.device.type == "cuda":
        pixels = pixels.pin_memory()  # the copy to the device then runs asynchronously
    return pixels


def _report(worker: Worker) -> WorkerReport:
    s = worker.stats
    tier = worker.device_tier.stats() if worker.copies_states else None
    return WorkerReport(
        s.batches, s.switches, s.mixed, worker.working.patched, worker.device_state_bytes, tier
    )
