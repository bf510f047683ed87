"""Many clients and several tasks at once; a cache smaller than the working set."""

import asyncio

import pytest
from server_support import TASKS, metric, png, serving, settings_for

from masks import inference

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


async def test_cache_holding_two_tasks_cycles_through_four(
    tmp_path, registry_dir, backbone, reference
):
    one_task = inference.params_nbytes(
        inference.materialise(reference.artifacts["alpha"], backbone)
    )
    budget = int(2.5 * one_task)
    settings = settings_for(tmp_path, registry_dir, cache_bytes=budget)
    async with serving(settings, backbone) as client:
        for round_ in range(2):
            for task in TASKS:
                image = png(200 + round_)
                r = await client.post(f"/predict?task={task}", content=image)
                assert r.status_code == 200, r.text
                reference.check(task, image, r.json()["results"][0])
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_cache_evictions_total") >= 6
        assert metric(text, "piggy_cache_misses_total") == 8
        assert metric(text, "piggy_cache_entries") == 2
        assert 0 < metric(text, "piggy_cache_bytes") <= budget
        # A task still cached is a hit.
        r = await client.post(f"/predict?task={TASKS[-1]}", content=png(1))
        assert r.status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_cache_hits_total") == 1
