"""The loop of one engine worker process: messages in from the pool, answers out.

Messages (server/protocol.py), over one pipe: RunBatch, Forget, DropArena, Stop in; Ready
or StartFailed once at start, then BatchDone or BatchFailed per batch out. A batch's pixels
are read from the front ends' shared-memory arenas (server/arena.py); JPEGs sent encoded
are decoded here, on the worker's device.
"""

from __future__ import annotations

import io
import os
import signal

import torch

from piggyback_serve.masks.data import to_pixels
from piggyback_serve.masks.decode import decode_jpegs_on_device, open_image
from piggyback_serve.server.arena import ArenaReader
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.layout import Template
from piggyback_serve.server.engine.worker import Row, Worker
from piggyback_serve.server.protocol import (
    BatchDone,
    BatchFailed,
    DropArena,
    Forget,
    PixelRef,
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
                    pixels, undecodable = _pixels(arenas, list(refs), worker)
                    probs = worker.step([Row(key, states[key]) for key in keys], pixels)
                except Exception as exc:
                    why = f"{type(exc).__name__}: {exc}"
                    conn.send(BatchFailed(batch_id, why, _report(worker)))
                    continue
                probs = tuple(map(probs_to_bytes, probs))
                conn.send(BatchDone(batch_id, probs, _report(worker), undecodable))


def _pixels(
    arenas: ArenaReader, refs: list[PixelRef], worker: Worker
) -> tuple[torch.Tensor, dict[int, str]]:
    """The batch's pixels, and the rows whose JPEG could not be decoded (row -> why).

    Rows decoded by the front end are read from its arena. JPEG rows (`decode_to`) are
    decoded here, in one batch on the worker's device (masks/decode.py); one the device
    cannot decode is decoded on the CPU as the front end would have, and one that fails
    there too fails alone (its row stays zeros, its answer is replaced by the error)."""
    encoded = [i for i, ref in enumerate(refs) if ref.decode_to]
    if not encoded:
        pixels = arenas.stack(refs)
        if worker.device.type == "cuda":
            pixels = pixels.pin_memory()  # the copy to the device then runs asynchronously
        return pixels, {}
    size = refs[encoded[0]].decode_to
    batch = torch.empty((len(refs), 3, size, size), dtype=torch.uint8, device=worker.device)
    blobs = [arenas.bytes(refs[i]) for i in encoded]
    decoded, failed = decode_jpegs_on_device(blobs, size, worker.device)
    batch[encoded] = decoded
    undecodable = {}
    for j in failed:  # the CPU's answer, in the CPU path's words
        try:
            image = open_image(io.BytesIO(blobs[j]), size)
            batch[encoded[j]] = to_pixels(image, size).to(worker.device)
        except Exception as exc:  # Pillow's errors for a broken file are many
            undecodable[encoded[j]] = str(exc)
    plain = [i for i, ref in enumerate(refs) if not ref.decode_to]
    if plain:
        batch[plain] = arenas.stack([refs[i] for i in plain]).to(worker.device)
    return batch, undecodable


def _report(worker: Worker) -> WorkerReport:
    s = worker.stats
    tier = worker.device_tier.stats() if worker.copies_states else None
    return WorkerReport(
        s.batches, s.switches, s.mixed, worker.working.patched, worker.device_state_bytes, tier
    )
