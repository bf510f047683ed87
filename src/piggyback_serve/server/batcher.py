"""Per-task queues and the scheduler that turns them into batches for the engine.

One bounded queue per task. A batch mixes tasks: the scheduler fills one from every
queue, oldest image first (a hot task cannot starve a cold one), taking only images of the
oldest image's shape (one batch, one tensor), and submits it to the engine pool, which
picks the worker, runs it and retries (`EnginePool.submit`). A batch is formed when an
engine worker is idle and max_batch_size images wait or the oldest has waited max_delay,
whether or not another worker is busy. Waiting images are shared out among the idle
workers, so that 8 images and 2 idle workers make 2 batches of 4, not one of 8 and an idle
core. (An idle worker taking each image at once while another was busy kept both busy
too, but cut the mean batch from 8 to 2.6 and cost 1.8x the engine CPU per image on the
CPU: bench/results/RESULTS.md.)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from piggyback_serve.server.catalog import Task
from piggyback_serve.server.engine import EnginePool, Row, Undecodable, WorkerDied
from piggyback_serve.server.errors import (
    BatchFailed,
    NotAnImage,
    Overloaded,
    ServeError,
    Timeout,
    WorkerLost,
)
from piggyback_serve.server.metrics import Metrics
from piggyback_serve.server.protocol import PixelRef

log = logging.getLogger("piggy.serve")

Pixels = PixelRef | torch.Tensor


@dataclass
class _Item:
    task: Task
    x: Pixels  # a PixelRef (shared memory) or, in tests, a tensor: only shape and dtype read
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
        engine.on_change = self._wake.set
        self._runner: asyncio.Task | None = None
        self._running: set[asyncio.Future] = set()  # batches on the workers

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

    async def submit(self, task: Task, images: list[Pixels]) -> list:
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
        self, task: Task, images: list[Pixels], started: float, timeout_s: float
    ) -> list:
        """submit, or 504 once `timeout_s` has passed since `started` (time.perf_counter)."""
        remaining = timeout_s - (time.perf_counter() - started)
        try:
            return await asyncio.wait_for(self.submit(task, images), max(remaining, 0))
        except TimeoutError:
            raise Timeout(f"no answer within {timeout_s:g}s") from None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            idle = self.engine.idle_workers
            ready, deadline = self._pick()
            if ready and idle:
                size = min(self.max_batch_size, math.ceil(self.depth() / idle))
                batch = self._take(size)
                if batch:
                    self._submit(batch)
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

    def _take(self, size: int) -> list[_Item]:
        """Up to `size` images from all queues, oldest first, of one shape."""
        heads = [(q[0].enqueued, i, q) for i, q in enumerate(self._queues.values()) if q]
        heapq.heapify(heads)
        kind = _kind(heads[0][2][0]) if heads else None
        batch: list[_Item] = []
        while heads and len(batch) < size:
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

    def _submit(self, batch: list[_Item]) -> None:
        """Hand the batch to the engine; its answers reach the requests when it is done."""
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.labels(item.task.name).observe(started - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tasks.observe(len({item.task.key for item in batch}))
        rows = [Row(item.task.key, item.task.state) for item in batch]
        running = self.engine.submit(rows, [item.x for item in batch])
        self._running.add(running)

        def answer(done: asyncio.Future) -> None:
            self._running.discard(done)
            self.metrics.compute.observe(time.monotonic() - started)
            if done.cancelled():  # shutting down: nobody may wait forever
                for item in batch:
                    item.future.cancel()
                return
            exc = done.exception()
            results = done.result() if exc is None else [exc] * len(batch)
            failed = [r for r in results if isinstance(r, BaseException)]
            failed = [r for r in failed if not isinstance(r, Undecodable)]  # a client's image
            if failed:
                log.error("%d of a batch of %d failed: %s", len(failed), len(batch), failed[0])
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(_failure(result, item, batch))
                else:
                    item.future.set_result(torch.as_tensor(result))

        running.add_done_callback(answer)


def _failure(exc: BaseException, item: _Item, batch: list[_Item]) -> ServeError:
    """The API error a request gets for an engine failure of its row."""
    if isinstance(exc, WorkerDied):  # not the task's fault: the client may retry
        return WorkerLost(f"the engine worker running this batch was lost ({exc}); retry")
    if isinstance(exc, Undecodable):  # this image alone
        return NotAnImage(f"image could not be decoded: {exc}")
    same = sum(other.task.key == item.task.key for other in batch)
    return BatchFailed(
        f"the batch of {same} images for task {item.task.name!r} failed: "
        f"{type(exc).__name__}: {exc}"
    )


def _kind(item: _Item) -> tuple:
    """What images must share to stack into one batch: shape and dtype."""
    if isinstance(item.x, PixelRef):
        return item.x.row
    return item.x.shape, item.x.dtype
