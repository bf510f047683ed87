"""The loop of one engine worker process: messages in from the pool, answers out.

Messages from the pool (server/engine/pool.py), over one pipe:
- ("batch", id, keys, new_states, pixels): run a batch; `new_states` holds the states of
  the tasks among `keys` this worker has not been sent yet (so no batch can meet a task
  it does not know); pixels is a numpy array (uint8 as decoded, or float preprocessed);
- ("forget", keys): drop these tasks' states; ("stop",): exit. So does a closed pipe.
Answers: ("ready", pid) or ("failed", why) once at start; per batch ("done", id, probs,
stats) or ("error", id, why, stats).
"""

from __future__ import annotations

import os
import signal

import torch

from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.layout import Template
from piggyback_serve.server.engine.worker import Row, Worker


def main(conn, config: WorkerConfig, template: Template) -> None:
    # Signals are the server's to handle: it drains, then closes the pipe or says stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(config.threads)
    try:
        worker = Worker(config, template)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    del template
    conn.send(("ready", os.getpid()))
    states = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "forget":
            for key in message[1]:
                states.pop(key, None)
            worker.forget(message[1])
            continue
        _, batch_id, keys, new_states, pixels = message
        states.update(new_states)
        try:
            probs = worker.step([Row(key, states[key]) for key in keys], _pixels(pixels, worker))
        except Exception as exc:
            conn.send(("error", batch_id, f"{type(exc).__name__}: {exc}", _stats(worker)))
            continue
        conn.send(("done", batch_id, [p.numpy() for p in probs], _stats(worker)))


def _pixels(array, worker: Worker) -> torch.Tensor:
    pixels = torch.from_numpy(array)
    if worker.device.type == "cuda":
        pixels = pixels.pin_memory()  # the copy to the device then runs asynchronously
    return pixels


def _stats(worker: Worker) -> tuple:
    s = worker.stats
    tier = worker.device_tier.stats() if worker.copies_states else None
    return s.batches, s.switches, s.mixed, worker.working.patched, worker.device_state_bytes, tier
