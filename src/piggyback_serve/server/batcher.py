"""Per-task queues and the scheduler that turns them into batches for the engine.

One bounded queue per task. A batch mixes tasks: once max_batch_size images wait or the
oldest has waited max_delay, and an engine worker is idle, the scheduler fills a batch
from every queue, oldest image first (a hot task cannot starve a cold one), taking only
images of the oldest image's shape (one batch, one tensor), and hands it to that worker
(the pool prefers the one whose working copy runs the batch's lead task). One batch runs
per worker, so several run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from piggyback_serve.server.catalog import Task
from piggyback_serve.server.engine import EnginePool, Row, WorkerDied
from piggyback_serve.server.errors import BatchFailed, Overloaded, Timeout, WorkerLost
from piggyback_serve.server.metrics import Metrics

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
        engine: EnginePool,
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
        engine.on_idle = self._wake.set
        self._runner: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # batches on the workers

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="piggy-batcher")

    async def close(self) -> None:
        tasks = [t for t in (self._runner, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            ready, deadline = self._pick()
            if ready and self.engine.has_idle:
                batch = self._take()
                if batch:
                    worker = self.engine.claim(batch[0].task.key)
                    task = asyncio.create_task(self._run_batch(worker, batch))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                continue
            # Not ready, or every worker busy: a new image or a worker going idle wakes us.
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _pick(self) -> tuple[bool, float | None]:
        """Whether a batch is ready now, else when the oldest image makes one ready."""
        oldest, waiting = None, 0
        for name, queue in list(self._queues.items()):
            while queue and queue[0].future.done():  # callers that gave up
                queue.popleft()
            if not queue:
                del self._queues[name]
                continue
            waiting += len(queue)
            if oldest is None or queue[0].enqueued < oldest:
                oldest = queue[0].enqueued
        if oldest is None:
            return False, None
        if waiting >= self.max_batch_size or time.monotonic() - oldest >= self.max_delay_s:
            return True, None
        return False, oldest + self.max_delay_s

    def _take(self) -> list[_Item]:
        """Up to max_batch_size images from all queues, oldest first, of one shape."""
        heads = [(q[0].enqueued, i, q) for i, q in enumerate(self._queues.values()) if q]
        heapq.heapify(heads)
        kind = _kind(heads[0][2][0]) if heads else None
        batch: list[_Item] = []
        while heads and len(batch) < self.max_batch_size:
            _, i, queue = heapq.heappop(heads)
            item = queue[0]
            if _kind(item) != kind:
                continue  # this queue waits for a batch of its own shape
            queue.popleft()
            if not item.future.done():
                batch.append(item)
            if queue:
                heapq.heappush(heads, (queue[0].enqueued, i, queue))
        return batch

    async def _run_batch(self, worker, batch: list[_Item]) -> None:
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.labels(item.task.name).observe(started - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tasks.observe(len({item.task.key for item in batch}))
        try:
            failed = await self._answer(batch, worker)
            if failed is not None and len({item.task.key for item in batch}) > 1:
                # A mixed batch failed: run each task alone, so that only the requests of
                # the task that fails (a bad task, a device fault on it) get the error.
                log.warning("mixed batch failed (%s); running its tasks one by one", failed)
                by_task: dict = {}
                for item in batch:
                    by_task.setdefault(item.task.key, []).append(item)
                failed = None
                for items in by_task.values():
                    failed = await self._answer(items) or failed
        finally:
            self.metrics.compute.observe(time.monotonic() - started)

    async def _answer(self, batch: list[_Item], worker=None) -> Exception | None:
        """Run one batch (on `worker` if claimed, else the next idle one) and answer its
        requests; the exception if the engine failed."""
        rows = [Row(item.task.key, item.task.state) for item in batch]
        x = torch.stack([item.x for item in batch])
        try:
            if worker is None:
                probs = await self.engine.predict(rows, x)
            else:
                probs = await self.engine.run(worker, rows, x)
        except asyncio.CancelledError:  # shutting down: nobody may wait forever
            for item in batch:
                item.future.cancel()
            raise
        except WorkerDied as exc:  # not the tasks' fault: no retry, the client may retry
            log.error("batch of %d lost with its worker: %s", len(batch), exc)
            lost = WorkerLost(f"the engine worker running this batch was lost ({exc}); retry")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(lost)
            return None
        except Exception as exc:
            if len({item.task.key for item in batch}) > 1:
                return exc  # the caller retries task by task
            names = sorted({item.task.name for item in batch})
            log.exception("batch of %d for task %s failed", len(batch), names[0])
            failed = BatchFailed(
                f"the batch of {len(batch)} images for task {names[0]!r} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failed)
            return exc
        for item, p in zip(batch, probs, strict=True):
            if not item.future.done():
                item.future.set_result(p)
        return None


def _kind(item: _Item) -> tuple:
    """What images must share to stack into one batch: shape and dtype."""
    return item.x.shape, item.x.dtype
