"""Where a job's trainer runs (server/jobs/runner.py): a spawned process on this host, or,
under Ray Serve, a Ray task on the cluster, so that training never runs inside a replica.

Both answer the manager the same way: `poll()` hands over what the trainer sent since
(`Stepped`, `Checkpointed`, and last its `Trained` or `Failed`), `exit_code()` says whether
it is gone, `stop()` ends it.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import sys
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from piggyback_serve.server.jobs import runner

STOP_S = 5.0  # a stopped trainer gets this long after SIGTERM before SIGKILL


class Trainer(Protocol):
    where: str  # shown on the job: "process 1234", "ray task 5e0c…"

    def poll(self) -> list:
        """Every message sent since the last poll (blocking calls: run it in a thread)."""

    def exit_code(self) -> int | None:
        """None while the trainer runs, else how it ended."""

    def stop(self) -> None: ...


def start_trainer(spec: runner.RunSpec, device: str) -> Trainer:
    """A Ray task where this process is a Ray Serve replica, else a spawned process."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return RayTrainer(spec, device)
    return ProcessTrainer(spec)


class ProcessTrainer:
    def __init__(self, spec: runner.RunSpec):
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(
            target=runner.main, args=(theirs, spec), name=f"piggy-train-{spec.job_id[:8]}"
        )
        self.process.daemon = True  # the server's end ends it; the job resumes at its return
        self.process.start()
        theirs.close()
        self.where = f"process {self.process.pid}"

    def poll(self) -> list:
        found = []
        with contextlib.suppress(EOFError, OSError):  # gone: exit_code says so
            while self.conn.poll():
                found.append(self.conn.recv())
        return found

    def exit_code(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.terminate()
            self.process.join(STOP_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(STOP_S)
        self.conn.close()


class RayTrainer:
    """The job as a Ray task asking for `train_threads` CPUs (and a GPU where the server
    serves from CUDA): its images travel packed through the object store, its progress
    and checkpoints come back through a Ray queue, its outcome as the task's result."""

    def __init__(self, spec: runner.RunSpec, device: str):
        import ray
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        checkpoint = spec.checkpoint.read_bytes() if spec.checkpoint.exists() else None
        gpus = 1 if _uses_cuda(device) else 0
        task = ray.remote(_train_on_ray).options(
            num_cpus=spec.threads, num_gpus=gpus, name=f"piggy-train-{spec.job_id[:8]}"
        )
        self.ref = task.remote(spec, _packed(spec.images), checkpoint, self.queue)
        self.where = f"ray task {self.ref.task_id().hex()}"
        self._failed: int | None = None

    def poll(self) -> list:
        import ray

        found = []
        with contextlib.suppress(Exception):  # the queue's actor gone: the task's end says
            found = self.queue.get_nowait_batch(self.queue.qsize())
        ready, _ = ray.wait([self.ref], timeout=0)
        if ready:
            try:
                found.append(ray.get(self.ref))
            except Exception as exc:  # the task itself died (its worker killed, node lost)
                found.append(runner.Failed("training_failed", f"the Ray task failed: {exc}"))
        return found

    def exit_code(self) -> int | None:
        return None  # its end arrives through poll(), as its result or its failure

    def stop(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(self.ref, force=True)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


def _uses_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def _packed(images: Path) -> bytes:
    """The job's checked class folders as one tar, for a node that does not see this disk."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(images, arcname="images")
    return buf.getvalue()


def _train_on_ray(spec: runner.RunSpec, images: bytes, checkpoint: bytes | None, queue):
    """The Ray task: the images and checkpoint in a folder of its own, then `runner.run`,
    each new checkpoint sent back as it is written (the manager keeps it for a resume)."""
    with tempfile.TemporaryDirectory(prefix="piggy-train-") as tmp:
        folder = Path(tmp)
        with tarfile.open(fileobj=io.BytesIO(images)) as tar:
            tar.extractall(folder, filter="data")  # our own tar of already checked files
        spec = replace(spec, images=folder / "images", checkpoint=folder / "checkpoint")
        if checkpoint is not None:
            spec.checkpoint.write_bytes(checkpoint)
        seen = [_mtime(spec.checkpoint)]

        def send(message) -> None:
            queue.put(message)
            if (mtime := _mtime(spec.checkpoint)) != seen[0]:
                seen[0] = mtime
                queue.put(runner.Checkpointed(spec.checkpoint.read_bytes()))

        return runner.run(spec, send)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
