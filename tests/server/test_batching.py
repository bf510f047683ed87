"""Many clients and several tasks at once: batches that mix tasks, answers that do not."""

import asyncio

import pytest

from tests.server.server_support import TASKS, blocked_engine, metric, png, serving, settings_for

pytestmark = pytest.mark.anyio


async def test_concurrent_clients_several_tasks_no_mixups(
    tmp_path, registry_dir, backbone, reference
):
    settings = settings_for(tmp_path, registry_dir, max_batch_size=8, max_delay_ms=20)
    jobs = [(TASKS[i % len(TASKS)], png(100 + i)) for i in range(48)]
    async with serving(settings, backbone) as client:

        async def one(task, image):
            r = await client.post(f"/predict?task={task}&top_k=3", content=image)
            assert r.status_code == 200, r.text
            return r.json()

        answers = await asyncio.wait_for(asyncio.gather(*(one(*job) for job in jobs)), 120)
        for (task, image), answer in zip(jobs, answers, strict=True):
            assert answer["task"] == task
            reference.check(task, image, answer["results"][0], top_k=3)

        text = (await client.get("/metrics")).text
        batches = metric(text, "piggy_batch_size_count")
        images = metric(text, "piggy_batch_size_sum")
        assert images == len(jobs)
        assert batches < len(jobs), "no batch held more than one image"
        for task in TASKS:
            assert metric(text, "piggy_images_total", task=task) == 12
            assert (
                metric(text, "piggy_requests_total", route="/predict", task=task, status="200")
                == 12
            )
        assert metric(text, "piggy_tasks_registered") == 4


async def test_mixed_batches_over_http_and_task_state_in_metrics(
    tmp_path, registry_dir, backbone, reference
):
    """Eight clients over four tasks: batches mix tasks, every answer is its own task's.
    One worker: with two, the idle one takes each image at once while the other is busy."""
    settings = settings_for(
        tmp_path, registry_dir, max_batch_size=8, max_delay_ms=50, engine_workers=1
    )
    jobs = [(TASKS[i % len(TASKS)], png(300 + i)) for i in range(16)]
    async with serving(settings, backbone) as client:
        posts = [client.post(f"/predict?task={task}", content=image) for task, image in jobs]
        answers = await asyncio.wait_for(asyncio.gather(*posts), 120)
        for (task, image), r in zip(jobs, answers, strict=True):
            assert r.status_code == 200, r.text
            reference.check(task, image, r.json()["results"][0])
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_mixed_batches_total") >= 1
        assert metric(text, "piggy_batch_tasks_sum") > metric(text, "piggy_batch_tasks_count")
        catalog = client.app.state.services.catalog
        state_bytes = sum(s.nbytes for s in catalog.host.states.values())
        assert len(catalog.host.states) == len(catalog.tasks)  # every task was used
        assert metric(text, "piggy_task_state_bytes") == state_bytes > 0
        assert metric(text, "piggy_tier_bytes", tier="host") == state_bytes
        assert metric(text, "piggy_working_copy_bytes") > 0


async def test_requests_waiting_while_their_task_is_replaced_or_deleted(
    tmp_path, registry_dir, backbone, reference
):
    """Requests already queued are answered by the version they were sent to."""
    settings = settings_for(tmp_path, registry_dir, max_batch_size=8, max_delay_ms=20)
    images = [png(400 + i) for i in range(4)]
    async with serving(settings, backbone) as client:
        release = blocked_engine(client)
        sends = [("alpha", images[0]), ("gamma", images[1]), ("alpha", images[2])]
        pending = [
            asyncio.create_task(client.post(f"/predict?task={task}", content=image))
            for task, image in sends
        ]
        await asyncio.sleep(0.5)  # decoded and queued behind the blocked engine
        assert not any(p.done() for p in pending)
        beta = (registry_dir / "beta.safetensors").read_bytes()
        assert (await client.put("/tasks/alpha", content=beta)).status_code == 201
        assert (await client.delete("/tasks/gamma")).status_code == 204
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(*pending), 60)
        for (task, image), r in zip(sends, answers, strict=True):
            assert r.status_code == 200, r.text
            reference.check(task, image, r.json()["results"][0])
        after = await client.post("/predict?task=alpha", content=images[3])
        reference.check("beta", images[3], after.json()["results"][0])
        assert (await client.post("/predict?task=gamma", content=images[3])).status_code == 404
