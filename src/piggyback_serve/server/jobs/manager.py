"""Runs the training jobs whose images this replica holds, each in a trainer of its own.

A job is accepted by a route (server/routes/jobs.py): its record `queued` in the job store,
then its class folders under `home/jobs/<id>/images`. The manager runs where the engine
runs (the single process, or the engine service beside the front ends). It claims the jobs
of its folder (a lock file in each job's folder, which the system lets go of when the
process dies, so that managers sharing a folder never run a job twice), starts queued ones
up to PIGGY_TRAIN_WORKERS at once, each in a trainer (server/jobs/trainers.py: a spawned
process, or a Ray task under Ray Serve) with PIGGY_TRAIN_THREADS torch threads on the CPU,
and writes their progress to the store. A trained task goes through the upload path (the
catalog's `put`: checked, stored in the registry, served by every replica). A cancel asked
through any replica stops the trainer. Then the job's folder is removed.

A job it claims that was left `running` (its server restarted, its replica replaced) is
queued again and resumes from its last epoch's checkpoint (masks/train.py). A job on
nobody's disk here whose record nobody touched for `STALE_S` fails saying so (its replica
is gone, or its images are), so that no job stays `running` for ever.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from piggyback_serve.masks.artifact import write_atomic
from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.server.errors import ServeError
from piggyback_serve.server.jobs import runner
from piggyback_serve.server.jobs.model import Job, JobError, JobResult, Progress, now
from piggyback_serve.server.jobs.store import JobStore, prune
from piggyback_serve.server.jobs.trainers import Trainer, start_trainer
from piggyback_serve.server.metrics import Metrics
from piggyback_serve.server.registry import RegistryError
from piggyback_serve.server.settings import Settings

log = logging.getLogger("piggy.jobs")

TICK_S = 0.2  # how often running jobs are looked at (progress, cancels, exits)
PROGRESS_S = 0.25  # progress written at most this often (and at every epoch's end)
HEARTBEAT_S = 5.0  # a job's record is touched at least this often while it is ours
STALE_S = 60.0  # a job nobody touched this long, on no replica's disk here, fails
CHECKPOINT = "checkpoint.safetensors"  # in the job's folder (masks/train.py writes it)

StoreTask = Callable[[str, bytes], Awaitable[object]]


def jobs_folder(settings: Settings) -> Path:
    return settings.home / "jobs"


def images_folder(settings: Settings, job_id: str) -> Path:
    """A job's class folders, as the route leaves them once its archive is unpacked."""
    return jobs_folder(settings) / job_id / "images"


def replica_name() -> str:
    return socket.gethostname()


@dataclass
class Running:
    job: Job
    trainer: Trainer
    written_at: float = 0.0
    dirty: bool = False  # progress not written yet
    outcome: runner.Trained | runner.Failed | None = None
    began: float = field(default_factory=time.monotonic)


class JobManager:
    def __init__(
        self, settings: Settings, store: JobStore, store_task: StoreTask, metrics: Metrics
    ):
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.store_task = store_task  # the catalog's put: the upload path
        self.root = jobs_folder(settings)
        self.running: dict[str, Running] = {}
        self._claims: dict[str, int] = {}  # job id -> the open lock file that makes it ours
        self._beat_at = 0.0
        self._stale_at = 0.0

    # The loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever (the app's background task)."""
        try:
            while True:
                await self._guarded(self.tick())
                await asyncio.sleep(TICK_S)
        finally:
            for run in self.running.values():  # the server stops: jobs resume at its return
                run.trainer.stop()
            for fd in self._claims.values():  # theirs to take, whoever runs next
                os.close(fd)
            self._claims.clear()

    async def _guarded(self, step: Awaitable[None]) -> None:
        try:
            await step
        except RegistryError as exc:  # the store is down: jobs go on, records wait
            log.warning("job store unavailable: %s", exc)
        except Exception:
            log.exception("training jobs: unexpected error")

    async def tick(self) -> None:
        await self.adopt()
        for job_id in list(self.running):
            await self._follow(self.running[job_id])
        await self._start_queued()
        clock = time.monotonic()
        if clock - self._beat_at > HEARTBEAT_S:
            self._beat_at = clock
            await self._heartbeat()
        if clock - self._stale_at > STALE_S / 4:
            self._stale_at = clock
            await self._fail_stale()

    # Starting ---------------------------------------------------------------------------

    def _local_ids(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.iterdir() if (p / "images").is_dir()}

    async def adopt(self) -> None:
        """Claim the jobs of our folder nobody holds: new ones, and those whose manager is
        gone (a restart, a replica replaced). One left `running` was interrupted: it is
        queued again and resumes from its checkpoint."""
        local = self._local_ids() - set(self._claims)
        if not local:
            return
        known = {j.id: j for j in await self.store.list()}
        for job_id in local:
            if not self._claim(job_id):
                continue  # another manager sharing this folder holds it
            job = known.get(job_id)
            if job is None or job.done:  # ended, or its record dropped: nothing to run
                self._release(job_id)
            elif job.state == "running":
                log.info("job %s (task %s) resumes after a restart", job.id, job.task)
                await self._save(job, state="queued")

    def _claim(self, job_id: str) -> bool:
        """Hold the job's lock file (released by the system if this process dies)."""
        fd = os.open(self.root / job_id / "claim", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._claims[job_id] = fd
        return True

    def _release(self, job_id: str) -> None:
        """Remove the job's folder (its images, checkpoint), then let go of its lock."""
        shutil.rmtree(self.root / job_id, ignore_errors=True)
        fd = self._claims.pop(job_id, None)
        if fd is not None:
            os.close(fd)

    async def _ours(self) -> list[Job]:
        """The records of the jobs we hold (read one by one: the store keeps many more)."""
        found = [await self.store.get(job_id) for job_id in list(self._claims)]
        return [job for job in found if job is not None]

    async def _start_queued(self) -> None:
        """Start the oldest queued jobs while trainers are free; end those cancelled. One
        of ours `running` with no trainer here lost it (its end could not be written: the
        store was down) and starts again, from its checkpoint."""
        waiting = ("queued", "running")
        ours = await self._ours()
        queued = [j for j in ours if j.state in waiting and j.id not in self.running]
        for job in sorted(queued, key=lambda j: j.created):
            if await self.store.cancel_asked(job.id):
                await self._end(job, state="cancelled")
            elif len(self.running) < self.settings.train_workers:
                await self._start(job)

    async def _start(self, job: Job) -> None:
        folder = self.root / job.id
        spec = runner.RunSpec(
            job_id=job.id,
            task=job.task,
            images=folder / "images",
            checkpoint=folder / CHECKPOINT,
            backbone=self.settings.backbone,
            weights=self.settings.backbone_weights,
            device=self.settings.device,
            threads=self.settings.train_threads,
            options=job.options.model_dump(),
        )
        trainer = await asyncio.to_thread(start_trainer, spec, self.settings.device)
        log.info(
            "job %s: training task %s (%d images), %s",
            job.id,
            job.task,
            job.data.images,
            trainer.where,
        )
        # Progress starts over from the trainer's first word: after a restart, the step
        # after its checkpoint.
        job = await self._save(
            job,
            state="running",
            started=job.started or now(),
            progress=Progress(),
            trainer=trainer.where,
        )
        self.running[job.id] = Running(job, trainer, written_at=time.monotonic())
        self.metrics.jobs_running.set(len(self.running))

    # Following --------------------------------------------------------------------------

    async def _follow(self, run: Running) -> None:
        await self._drain(run)
        if run.outcome is None and (code := run.trainer.exit_code()) is not None:
            await self._drain(run)  # what it sent just before it exited
            if run.outcome is None:
                run.outcome = runner.Failed(
                    "training_failed", f"the trainer exited with code {code}"
                )
        if run.outcome is not None:
            await self._finish(run)
            return
        if await self.store.cancel_asked(run.job.id):
            await asyncio.to_thread(run.trainer.stop)
            del self.running[run.job.id]
            await self._end(run.job, state="cancelled")
            return
        clock = time.monotonic()
        if run.dirty and clock - run.written_at >= PROGRESS_S:
            run.job = await self._save(run.job)
            run.written_at, run.dirty = clock, False

    async def _drain(self, run: Running) -> None:
        """Take every message the trainer sent: progress, checkpoints, then its outcome."""
        for message in await asyncio.to_thread(run.trainer.poll):
            match message:
                case runner.Stepped():
                    progress = Progress(
                        step=message.step,
                        steps=message.steps,
                        epoch=message.epoch,
                        epochs=message.epochs,
                        loss=round(message.loss, 6),
                    )
                    run.job = run.job.model_copy(update={"progress": progress})
                    run.dirty = True
                case runner.Checkpointed():  # a Ray task's: kept here for a resume
                    path = self.root / run.job.id / CHECKPOINT
                    await asyncio.to_thread(write_atomic, path, message.data)
                case runner.Trained() | runner.Failed():
                    run.outcome = message

    async def _finish(self, run: Running) -> None:
        del self.running[run.job.id]
        await asyncio.to_thread(run.trainer.stop)  # a process exits by itself: reaped here
        job, outcome = run.job, run.outcome
        if isinstance(outcome, runner.Failed):
            log.warning("job %s failed: %s", job.id, outcome.message)
            await self._end(
                job, state="failed", error=JobError(code=outcome.code, message=outcome.message)
            )
            return
        try:
            await self.store_task(job.task, outcome.artifact)
        except (ServeError, ArtifactError) as exc:  # storage, outage; invalid (a new backbone?)
            code = getattr(exc, "code", "invalid_artifact")
            error = JobError(code=code, message=f"the task was learned but not stored: {exc}")
            await self._end(job, state="failed", error=error)
            return
        result = JobResult(
            accuracy=round(outcome.accuracy, 6),
            baseline_accuracy=round(outcome.baseline_accuracy, 6),
            size_bytes=len(outcome.artifact),
            sparsity=round(outcome.sparsity, 6),
        )
        log.info(
            "job %s: task %s learned, held-out accuracy %.4f (classifier-only %.4f)",
            job.id,
            job.task,
            result.accuracy,
            result.baseline_accuracy,
        )
        self.metrics.job_seconds.observe(time.monotonic() - run.began)
        await self._end(job, state="succeeded", result=result)

    async def _end(self, job: Job, **changes) -> None:
        job = await self._save(job, finished=now(), **changes)
        self.metrics.jobs.labels(job.state).inc()
        self.metrics.jobs_running.set(len(self.running))
        self._release(job.id)
        await prune(self.store)

    async def _save(self, job: Job, **changes) -> Job:
        job = job.model_copy(update={**changes, "updated": time.time()})
        await self.store.put(job)
        return job

    # Upkeep -----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Touch our queued jobs' records (running ones are touched by their progress)."""
        for job in await self._ours():
            if job.id in self.running:
                run = self.running[job.id]
                run.job = await self._save(run.job)
                run.written_at, run.dirty = time.monotonic(), False
            elif job.state == "queued":
                await self._save(job)

    async def _fail_stale(self) -> None:
        local = self._local_ids()
        cutoff = time.time() - STALE_S
        for job in await self.store.list():
            if not job.done and job.id not in local and job.updated < cutoff:
                message = (
                    f"replica {job.replica}, which held this job, has not been heard from for "
                    f"{STALE_S:.0f} s (stopped, or its disk lost): submit it again"
                )
                await self._save(
                    job,
                    state="failed",
                    finished=now(),
                    error=JobError(code="replica_lost", message=message),
                )
