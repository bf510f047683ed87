"""The engine pool behind the server: worker processes start, every worker learns a task
before it serves it, and a worker that dies fails only its own batch and is replaced."""

import asyncio
import contextlib
import os
import signal

import pytest
import torch

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from tests.server.server_support import (
    Reference,
    make_artifact,
    metric,
    png,
    serving,
    settings_for,
    until,
)

pytestmark = pytest.mark.anyio


async def post(client, task: str, image: bytes):
    headers = {"content-type": "image/png"}
    return await client.post(f"/predict?task={task}", content=image, headers=headers)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_start_as_processes_and_show_in_readyz_and_metrics(settings, backbone):
    settings = settings.model_copy(update={"engine_workers": 2})
    async with serving(settings, backbone) as client:
        workers = (await client.get("/readyz")).json()["workers"]
        assert [w["index"] for w in workers] == [0, 1]
        assert {w["state"] for w in workers} == {"ready"} and {w["device"] for w in workers} == {
            "cpu"
        }
        pids = {w["pid"] for w in workers}
        assert len(pids) == 2 and os.getpid() not in pids and all(map(alive, pids))
        await post(client, "alpha", png(1))
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_engine_workers") == 2
        assert metric(text, "piggy_engine_workers_alive") == 2
        assert metric(text, "piggy_worker_alive", worker="1") == 1
        batches = [metric(text, "piggy_worker_batches_total", worker=str(i)) for i in (0, 1)]
        assert sum(batches) == 1
    assert not any(map(alive, pids))  # the workers stop with the server


async def test_a_task_reaches_every_worker_before_it_is_served(settings, backbone, reference):
    """Uploaded, replaced and deleted under concurrent load: every answer is the version
    it was sent to, from whichever worker ran it."""
    settings = settings.model_copy(update={"engine_workers": 2, "max_batch_size": 2})
    first = make_artifact(backbone, "new", n_labels=3, seed=41)
    second = make_artifact(backbone, "new", n_labels=6, seed=42)
    async with serving(settings, backbone) as client:
        pool = client.app.state.services.engine
        own = load_backbone(backbone.name, "random")  # the server's may be in use
        for art in (first, second):
            ref = Reference(own, {"new": art})
            r = await client.put("/tasks/new", content=artifacts.to_bytes(art))
            assert r.status_code == 201, r.text
            images = [png(700 + i) for i in range(12)]
            answers = await asyncio.gather(*(post(client, "new", img) for img in images))
            for image, answer in zip(images, answers, strict=True):
                assert answer.status_code == 200, answer.text
                labels = [t["label"] for t in answer.json()["results"][0]["top"]]
                assert len(labels) == min(5, len(art.labels))  # never the other version's
                ref.check("new", image, answer.json()["results"][0])
            assert all(w.batches > 0 for w in pool.workers())  # both ran it
        assert (await client.delete("/tasks/new")).status_code == 204
        assert not any(key[0] == "new" for h in pool._handles.values() for key in h.known)
        assert (await post(client, "new", png(1))).status_code == 404


async def test_a_killed_worker_fails_only_its_batch_and_is_replaced(
    tmp_path, registry_dir, backbone, reference
):
    settings = settings_for(tmp_path, registry_dir, engine_workers=2, max_batch_size=4)
    async with serving(settings, backbone) as client:
        pool = client.app.state.services.engine
        # Only worker 0 free, and stopped: the first request's batch waits on it.
        doomed = pool.workers()[0].pid
        held = pool._claim(None)  # worker 0 when both are idle: hold the other one
        if held.config.index == 0:
            other = pool._claim(None)
            pool._release(held, held.pending[0])
            held = other
        os.kill(doomed, signal.SIGSTOP)
        lost = asyncio.create_task(post(client, "alpha", png(1)))
        await until(lambda: pool.workers()[0].busy)
        pool._release(held, held.pending[0])  # worker 1 serves the rest meanwhile
        images = [png(10 + i) for i in range(6)]
        answers = await asyncio.gather(*(post(client, "beta", img) for img in images))
        for image, answer in zip(images, answers, strict=True):
            assert answer.status_code == 200, answer.text
            reference.check("beta", image, answer.json()["results"][0])
        assert not lost.done()
        os.kill(doomed, signal.SIGKILL)
        r = await lost
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_lost", r.text
        assert int(r.headers["retry-after"]) >= 1
        await until(lambda: pool.alive == 2 and pool.workers()[0].restarts == 1)
        replaced = (await client.get("/readyz")).json()["workers"][0]
        assert replaced["state"] == "ready" and replaced["pid"] != doomed
        for i in range(4):  # both serve again, the new one included
            r = await post(client, ("alpha", "gamma")[i % 2], png(i))
            assert r.status_code == 200
            reference.check(("alpha", "gamma")[i % 2], png(i), r.json()["results"][0])
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_worker_restarts_total", worker="0") == 1


def steer_to_worker_0(pool):
    """Worker 1 claimed (as if busy), so that the next batch lands on worker 0; the claim."""
    held = pool._claim(None)  # worker 0 when both are idle: hold the other one
    if held.config.index == 0:
        other = pool._claim(None)
        pool._release(held, held.pending[0])
        held = other
    return held


async def test_a_hung_worker_is_killed_after_the_timeout_and_replaced(
    tmp_path, registry_dir, backbone, reference
):
    settings = settings_for(tmp_path, registry_dir, engine_workers=2, worker_timeout_s=2)
    async with serving(settings, backbone) as client:
        pool = client.app.state.services.engine
        assert pool.batch_timeout_s == 2
        hung = pool.workers()[0].pid
        held = steer_to_worker_0(pool)
        os.kill(hung, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            r = await post(client, "alpha", png(1))
            took = loop.time() - started
            pool._release(held, held.pending[0])
            assert r.status_code == 503 and r.json()["error"]["code"] == "worker_lost", r.text
            assert "did not answer within 2s" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            assert 2 <= took < 2 + 3, took
            await until(lambda: pool.alive == 2 and pool.workers()[0].restarts == 1)
            assert not alive(hung)
            workers = (await client.get("/readyz")).json()["workers"]
            assert [w["state"] for w in workers] == ["ready", "ready"]
            assert workers[0]["pid"] != hung and [w["restarts"] for w in workers] == [1, 0]
            images = [png(20 + i) for i in range(6)]
            answers = await asyncio.gather(*(post(client, "beta", img) for img in images))
            for image, answer in zip(images, answers, strict=True):
                assert answer.status_code == 200, answer.text
                reference.check("beta", image, answer.json()["results"][0])
            text = (await client.get("/metrics")).text
            assert metric(text, "piggy_worker_restarts_total", worker="0") == 1
            assert metric(text, "piggy_engine_workers_alive") == 2
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)


async def test_every_worker_hung_makes_readyz_503_until_they_are_replaced(
    tmp_path, registry_dir, backbone
):
    """Processes that outlive their SIGKILL (stuck in a device driver), played by stopped
    workers whose kill is held back: shown "hung", and the server is not ready."""
    settings = settings_for(tmp_path, registry_dir, engine_workers=2, worker_timeout_s=1)
    async with serving(settings, backbone) as client:
        pool = client.app.state.services.engine
        handles = list(pool._handles.values())
        pids = [h.pid for h in handles]
        for handle in handles:
            handle.process.kill = lambda: None
            os.kill(handle.pid, signal.SIGSTOP)
        try:
            for task in ("alpha", "beta"):  # one batch each, on each worker in turn
                r = await post(client, task, png(1))
                assert r.status_code == 503 and r.json()["error"]["code"] == "worker_lost"
            assert [w.state for w in pool.workers()] == ["hung", "hung"]
            r = await client.get("/readyz")
            assert r.status_code == 503 and "2 hung" in r.json()["error"]["message"], r.text
            text = (await client.get("/metrics")).text
            assert metric(text, "piggy_engine_workers_alive") == 0
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await until(lambda: pool.alive == 2)
        assert [w.restarts for w in pool.workers()] == [1, 1]
        assert (await client.get("/readyz")).status_code == 200
        assert (await post(client, "alpha", png(2))).status_code == 200


def test_large_batches_cross_the_pipe_under_uvloop(backbone):
    """uvicorn runs uvloop: megabyte batches reach the workers and come back (a pipe that
    the event loop had made non-blocking once failed them as a lost worker)."""
    import uvloop

    from piggyback_serve.server.engine import EnginePool, Row
    from piggyback_serve.server.settings import Settings

    art = make_artifact(backbone, "big", n_labels=3, seed=5, input_size=224)
    x = torch.randint(0, 256, (16, 3, 224, 224), dtype=torch.uint8)  # 2.4 MB

    async def run():
        pool = EnginePool(
            Settings(backbone=backbone.name, device="cpu", engine_workers=2), backbone
        )
        await pool.start()
        try:
            rows = [Row(("big", "1"), pool.prepare(art))] * len(x)
            answers = await asyncio.gather(*(pool.predict(rows, x) for _ in range(4)))
            return answers, pool.workers()
        finally:
            await pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        answers, workers = runner.run(run())
    assert all(torch.equal(a[0], answers[0][0]) for a in answers)
    assert all(w.restarts == 0 for w in workers)
