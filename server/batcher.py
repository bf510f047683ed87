"""Per-task queues and the scheduler that turns them into batches for the engine.

One bounded queue per task. The scheduler runs a queue's batch when it is full or its
oldest request has waited max_delay; among ready queues it takes the one whose oldest
request has waited longest, so a hot task cannot starve a cold one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from server.catalog import Task
from server.engine import Engine
from server.errors import BatchFailed, Overloaded, Timeout
from server.metrics import Metrics

log = logging.getLogger("piggy.serve")


@dataclass
class _Item:
    task: Task
    x: torch.Tensor
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
    ):
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self._queues: dict[str, deque[_Item]] = {}
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="piggy-batcher")

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for queue in self._queues.values():
            for item in queue:
                item.future.cancel()

    def depth(self, name: str | None = None) -> int:
        """Images waiting (not yet in a running batch), for one task or all."""
        if name is not None:
            return len(self._queues.get(name, ()))
        return sum(len(q) for q in self._queues.values())

    async def submit(self, task: Task, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities per image, in order. Cancelling the caller drops its images."""
        queue = self._queues.setdefault(task.name, deque())
        if len(queue) + len(images) > self.queue_size:
            raise Overloaded(
                f"task {task.name!r} has {len(queue)} images queued "
                f"(bound {self.queue_size}); retry later"
            )
        items = [_Item(task, x) for x in images]
        queue.extend(items)
        self._wake.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    async def submit_within(
        self, task: Task, images: list[torch.Tensor], started: float, timeout_s: float
    ) -> list[torch.Tensor]:
        """submit, or 504 once `timeout_s` has passed since `started` (time.perf_counter)."""
        remaining = timeout_s - (time.perf_counter() - started)
        try:
            return await asyncio.wait_for(self.submit(task, images), max(remaining, 0))
        except TimeoutError:
            raise Timeout(f"no answer within {timeout_s:g}s") from None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            name, deadline = self._pick()
            if name is None:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            batch = self._take(name)
            if batch:
                await self._run_batch(batch)

    def _pick(self) -> tuple[str | None, float | None]:
        """The ready queue with the oldest head, else when the next one gets ready."""
        now = time.monotonic()
        best, best_since, deadline = None, None, None
        for name, queue in list(self._queues.items()):
            while queue and queue[0].future.done():  # callers that gave up
                queue.popleft()
            if not queue:
                del self._queues[name]
                continue
            since = queue[0].enqueued
            if len(queue) >= self.max_batch_size or now - since >= self.max_delay_s:
                if best_since is None or since < best_since:
                    best, best_since = name, since
            else:
                ready_at = since + self.max_delay_s
                deadline = ready_at if deadline is None else min(deadline, ready_at)
        return best, deadline

    def _take(self, name: str) -> list[_Item]:
        queue = self._queues[name]
        version = queue[0].task.version
        batch: list[_Item] = []
        # A replaced artifact starts a new batch: one batch, one set of weights.
        while queue and len(batch) < self.max_batch_size and queue[0].task.version == version:
            item = queue.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        task = batch[0].task
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.labels(task.name).observe(started - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        try:
            probs = await self.engine.predict(task, torch.stack([item.x for item in batch]))
        except asyncio.CancelledError:  # shutting down: nobody may wait forever
            for item in batch:
                item.future.cancel()
            raise
        except Exception as exc:
            log.exception("batch of %d for task %s failed", len(batch), task.name)
            failed = BatchFailed(
                f"the batch of {len(batch)} images for task {task.name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failed)
            return
        finally:
            self.metrics.compute.labels(task.name).observe(time.monotonic() - started)
        for item, p in zip(batch, probs, strict=True):
            if not item.future.done():
                item.future.set_result(p)
