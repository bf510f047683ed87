"""Overload, a failing batch and clients that vanish, in-process: the server stays up,
answers what it accepted correctly, refuses the rest cleanly, and leaks nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import threading

import psutil
import pytest
import torch

from tests.server.server_support import blocked_engine, png, serving, settings_for, until

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


async def post(client, task: str, image: bytes):
    return await client.post(
        f"/predict?task={task}", content=image, headers={"content-type": "image/png"}
    )


async def test_a_burst_at_5x_capacity(tmp_path, registry_dir, backbone, reference):
    queue, batch = 8, 4
    settings = settings_for(tmp_path, registry_dir, queue_size=queue, max_batch_size=batch)
    capacity = 2 * queue  # two task queues; every worker is blocked, so no batch is out
    n = 5 * capacity
    images = {i: png(1000 + i) for i in range(n)}
    task_of = {i: ("alpha", "beta")[i % 2] for i in range(n)}
    process = psutil.Process()
    async with serving(settings, backbone) as client:
        batcher = client.app.state.services.batcher
        await post(client, "alpha", images[0])  # warm: materialised weights in the cache
        await post(client, "beta", images[0])
        gc.collect()
        rss_before = process.memory_info().rss
        release = blocked_engine(client)  # the burst lands while the engine is busy
        try:
            requests = [asyncio.create_task(post(client, task_of[i], images[i])) for i in range(n)]
            await until(lambda: batcher.depth("alpha") == queue and batcher.depth("beta") == queue)
            await until(lambda: sum(r.done() for r in requests) >= n - capacity)
            await asyncio.sleep(0.2)
            refused = [r.result() for r in requests if r.done()]
            rss_peak = process.memory_info().rss
        finally:
            release.set()
        answers = await asyncio.gather(*requests)
        ok = [i for i, r in enumerate(answers) if r.status_code == 200]
        rejected = [r for r in answers if r.status_code != 200]
        assert len(ok) >= 2 * queue and len(ok) + len(rejected) == n
        assert len(rejected) >= n - capacity and len(refused) == len(rejected)
        for r in rejected:
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert int(r.headers["retry-after"]) >= 1
        for i in ok:
            reference.check(task_of[i], images[i], answers[i].json()["results"][0])
        # Memory bounded: queued work is a few 32 px tensors, nothing piles up.
        assert rss_peak - rss_before < 150 * MiB, (rss_before // MiB, rss_peak // MiB)
        # Afterwards it serves normally, the queues empty.
        for i in range(4):
            r = await post(client, task_of[i], images[i])
            assert r.status_code == 200
            reference.check(task_of[i], images[i], r.json()["results"][0])
        assert batcher.depth() == 0
    print(f"burst {n} at capacity {capacity}: {len(ok)} answered, {len(rejected)} 503")


async def test_a_failing_batch_fails_only_its_own_requests(settings, backbone, reference):
    """A mixed batch that fails is retried task by task: only beta's requests get a 500."""
    async with serving(settings, backbone) as client:
        catalog = client.app.state.services.catalog
        original = catalog.tasks["beta"]
        # A state the worker cannot run (its head does not fit the features): the worker
        # process raises on every batch with beta in it, as on a device fault.
        good = (await catalog.resident(original)).state
        broken = dataclasses.replace(original, version="broken")
        catalog.host.put(broken.key, dataclasses.replace(good, head_weight=torch.zeros(2, 3)))
        catalog.tasks["beta"] = broken
        images = [png(2000 + i) for i in range(8)]
        answers = await asyncio.gather(
            *(post(client, ("alpha", "beta")[i % 2], img) for i, img in enumerate(images))
        )
        for i, r in enumerate(answers):
            if i % 2:
                assert r.status_code == 500, r.text
                err = r.json()["error"]
                assert err["code"] == "batch_failed" and "RuntimeError" in err["message"]
            else:
                assert r.status_code == 200, r.text
                reference.check("alpha", images[i], r.json()["results"][0])
        catalog.tasks["beta"] = original  # the server goes on: beta works again
        r = await post(client, "beta", images[1])
        assert r.status_code == 200
        reference.check("beta", images[1], r.json()["results"][0])
        metrics = (await client.get("/metrics")).text
        assert 'piggy_errors_total{code="batch_failed",task="beta"} 4.0' in metrics


async def test_clients_that_go_away_leak_nothing(settings, backbone, reference):
    process = psutil.Process()
    # Small batches: with the engine blocked, one batch is taken and the rest stay queued.
    settings = settings.model_copy(update={"max_batch_size": 4})
    async with serving(settings, backbone) as client:
        batcher = client.app.state.services.batcher
        await post(client, "alpha", png(1))

        def resources():
            gc.collect()
            return len(asyncio.all_tasks()), threading.active_count(), process.num_fds()

        before = resources()
        for round_ in range(3):
            release = blocked_engine(client)
            try:
                requests = [
                    asyncio.create_task(post(client, ("alpha", "beta")[i % 2], png(i)))
                    for i in range(20)
                ]
                await until(lambda: batcher.depth() >= 10)
                for r in requests:  # the clients hang up mid-request
                    r.cancel()
                await asyncio.gather(*requests, return_exceptions=True)
            finally:
                release.set()
            # A body cut short by a disconnect: answered or dropped, nothing left behind.
            app = client.app
            messages = iter([{"type": "http.request", "body": png(5)[:50], "more_body": True}])

            async def receive(messages=messages):
                return next(messages, {"type": "http.disconnect"})

            async def send(message):
                pass

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict",
                "query_string": b"task=alpha", "headers": [(b"content-type", b"image/png")],
                "server": ("piggy", 80), "client": ("127.0.0.1", 1), "root_path": "", "state": {},
            }  # fmt: skip
            await app(scope, receive, send)
            r = await post(client, "alpha", png(round_))
            assert r.status_code == 200
            reference.check("alpha", png(round_), r.json()["results"][0])
        await until(lambda: batcher.depth() == 0 and not batcher._queues)
        await asyncio.sleep(0.1)
        after = resources()
        assert after[0] <= before[0] and after[2] <= before[2] + 2, (before, after)
        # Threads: pools grow to their bounds, never past them: asyncio's default pool
        # (decoding) and anyio's 40 (FastAPI runs plain-function dependencies there).
        pool = min(32, (os.cpu_count() or 1) + 4) + 40
        assert after[1] <= before[1] + pool, (before, after)
