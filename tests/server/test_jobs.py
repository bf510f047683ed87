"""Training jobs through the API, in one server process on a folder registry: an archive in,
a served task out; the events; cancel; a job taken back after a restart; refusals."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.server_support import metric, serving, settings_for

pytestmark = pytest.mark.anyio

FAST = {"epochs": 1, "min_steps": 2, "batch_size": 4, "input_size": 32, "held_out": 0.25}


def colour_png(rgb: tuple[int, int, int], seed: int, size: int = 12) -> bytes:
    """A noisy image of one colour: classes told apart by colour are learnable at once."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.integers(-30, 30, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


CLASSES = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def tar_gz(per_class: int = 6, classes: dict = CLASSES, top: str | None = "photos") -> bytes:
    """A tar.gz of one folder per class, inside one top folder when `top` is given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for c, (name, rgb) in enumerate(classes.items()):
            for i in range(per_class):
                data = colour_png(rgb, seed=100 * c + i)
                info = tarfile.TarInfo("/".join(p for p in (top, name, f"{i}.png") if p))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zipped(per_class: int = 6, classes: dict = CLASSES) -> bytes:
    """A zip of one folder per class at its root."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for c, (name, rgb) in enumerate(classes.items()):
            for i in range(per_class):
                archive.writestr(f"{name}/{i}.png", colour_png(rgb, seed=100 * c + i))
    return buf.getvalue()


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (await client.get(f"/jobs/{job_id}")).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} not done in {timeout_s}s: {job}")


@pytest.fixture
def job_settings(tmp_path: Path):
    def make(**overrides):
        return settings_for(tmp_path / "home", tmp_path / "registry", **overrides)

    return make


async def test_an_archive_becomes_a_served_task(job_settings):
    async with serving(job_settings()) as client:
        answer = await client.post("/tasks/colours/train", params=FAST, content=tar_gz())
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert answer.headers["location"] == f"/jobs/{job['id']}"
        assert job["state"] == "queued" and job["task"] == "colours"
        assert job["data"] == {"classes": ["blue", "red"], "images": 12, "skipped": 0}

        # The events: one per change, the last one final; the stream then ends.
        async with client.stream("GET", f"/jobs/{job['id']}/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            body = (await events.aread()).decode()
        shown = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
        assert shown[-1]["state"] == "succeeded"
        steps = [j["progress"]["step"] for j in shown if j["state"] == "running"]
        assert steps == sorted(steps) and steps[-1] == shown[-1]["progress"]["steps"] >= 2

        done = (await client.get(f"/jobs/{job['id']}")).json()
        result = done["result"]
        assert done["started"] and done["finished"] and done["error"] is None
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["baseline_accuracy"] <= 1
        assert result["size_bytes"] > 0

        # Served at once, through the upload path: listed with the artifact's metrics.
        task = (await client.get("/tasks/colours")).json()
        assert task["labels"] == ["blue", "red"]
        assert task["metrics"]["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)
        predicted = await client.post(
            "/predict?task=colours",
            content=colour_png(CLASSES["red"], seed=999),
            headers={"content-type": "image/png"},
        )
        assert predicted.status_code == 200, predicted.text
        assert (await client.get("/jobs")).json()["jobs"][0]["id"] == job["id"]
        # The job's folder (its images) is gone once it ended.
        assert not (job_settings().home / "jobs" / job["id"]).exists()


async def test_cancel_stops_the_trainer(job_settings):
    async with serving(job_settings()) as client:
        long = {**FAST, "min_steps": 100_000}
        job = (await client.post("/tasks/forever/train", params=long, content=tar_gz())).json()
        deadline = time.monotonic() + 60
        while (await client.get(f"/jobs/{job['id']}")).json()["progress"]["step"] < 1:
            assert time.monotonic() < deadline, "the job never started"
            await asyncio.sleep(0.2)
        # One trainer (PIGGY_TRAIN_WORKERS=1): a second job waits queued, and is cancelled
        # there at once.
        waiting = (await client.post("/tasks/later/train", params=long, content=tar_gz())).json()
        await asyncio.sleep(0.5)
        assert (await client.get(f"/jobs/{waiting['id']}")).json()["state"] == "queued"
        cancelled = await client.delete(f"/jobs/{waiting['id']}")
        assert cancelled.json()["state"] == "cancelled" and cancelled.json()["started"] is None
        cancelled = await client.delete(f"/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert (await client.delete(f"/jobs/{job['id']}")).status_code == 409
        assert (await client.get("/tasks/forever")).status_code == 404
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_jobs_total", state="cancelled") == 2


async def test_a_job_interrupted_by_a_restart_resumes(job_settings):
    options = {**FAST, "epochs": 3, "min_steps": 0, "batch_size": 2}
    settings = job_settings()
    async with serving(settings) as client:
        job = (await client.post("/tasks/later/train", params=options, content=tar_gz())).json()
        checkpoint = settings.home / "jobs" / job["id"] / "checkpoint.safetensors"
        deadline = time.monotonic() + 60
        while not checkpoint.exists():  # the first epoch is done
            assert time.monotonic() < deadline, "no checkpoint written"
            await asyncio.sleep(0.05)
    # The server stopped in the middle of the job, and its trainer with it.
    record = settings.home.parent / "registry" / "jobs" / f"{job['id']}.json"
    before = json.loads(record.read_text())
    assert before["state"] == "running" and before["trainer"].startswith("process ")
    async with serving(settings) as client:
        async with client.stream("GET", f"/jobs/{job['id']}/events") as events:
            body = (await events.aread()).decode()
        shown = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
        assert shown[-1]["state"] == "succeeded", shown[-1]
        per_epoch = shown[-1]["progress"]["steps"] // shown[-1]["progress"]["epochs"]
        # The new trainer's steps (the stream may open on the record as the restart left it).
        running = [
            j["progress"]["step"]
            for j in shown
            if j["state"] == "running" and j["trainer"] != before["trainer"]
        ]
        steps = [step for step in running if step]
        # Resumed after its checkpoint: no step of the first epoch is run again.
        assert steps and min(steps) > per_epoch, (steps, per_epoch)
        assert (await client.get("/tasks/later")).status_code == 200


async def test_refusals(job_settings):
    async with serving(job_settings(max_archive_bytes=4096)) as client:
        one_class = tar_gz(classes={"red": CLASSES["red"]})
        too_big = await client.post("/tasks/x/train", content=tar_gz(per_class=20))
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        refused = await client.post("/tasks/x/train", content=one_class)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_archive"
        bad = await client.post("/tasks/x/train", params={"held_out": 2}, content=one_class)
        assert bad.status_code == 400 and "held_out" in bad.json()["error"]["message"]
        assert (await client.post("/tasks/a.b/train", content=one_class)).status_code == 400
        assert (await client.get("/jobs/0123")).status_code == 404
        assert (await client.get("/jobs")).json() == {"jobs": []}
        assert not list((job_settings().home / "jobs").glob("*/*"))  # nothing left behind


async def test_admin_token_guards_training(job_settings):
    async with serving(job_settings(admin_token="s3cret")) as client:
        assert (await client.post("/tasks/x/train", content=tar_gz())).status_code == 401
        admin = {"Authorization": "Bearer s3cret"}
        answer = await client.post("/tasks/x/train", content=tar_gz(), headers=admin)
        assert answer.status_code == 202
        job_id = answer.json()["id"]
        assert (await client.get(f"/jobs/{job_id}")).status_code == 200  # reading is open
        assert (await client.delete(f"/jobs/{job_id}")).status_code == 401
        cancelled = await client.delete(f"/jobs/{job_id}", headers=admin)
        assert cancelled.json()["state"] == "cancelled"


def test_managers_sharing_a_folder_never_hold_the_same_job(tmp_path):
    """Two servers on one PIGGY_HOME (two replicas on a host, Ray replicas on a node): a
    job's lock file lets one run it; the other takes it once the first lets go."""
    from piggyback_serve.server.jobs.manager import JobManager
    from piggyback_serve.server.jobs.store import DirJobStore
    from piggyback_serve.server.metrics import Metrics

    settings = settings_for(tmp_path / "home", tmp_path / "registry")
    store = DirJobStore(tmp_path / "registry" / "jobs")
    first, second = (JobManager(settings, store, None, Metrics()) for _ in range(2))
    (settings.home / "jobs" / ("a" * 32) / "images").mkdir(parents=True)
    assert first._claim("a" * 32) and not second._claim("a" * 32)
    os.close(first._claims.pop("a" * 32))  # as a process that dies lets go
    assert second._claim("a" * 32)


async def test_a_job_whose_replica_went_silent_fails_saying_so(tmp_path):
    """No job stays `running` for ever: one on no disk here, untouched for a minute, fails."""
    from piggyback_serve.server.jobs.manager import STALE_S, JobManager
    from piggyback_serve.server.jobs.model import Job, JobData, TrainOptions
    from piggyback_serve.server.jobs.store import DirJobStore
    from piggyback_serve.server.metrics import Metrics

    settings = settings_for(tmp_path / "home", tmp_path / "registry")
    store = DirJobStore(tmp_path / "registry" / "jobs")
    data = JobData(classes=["a", "b"], images=4)
    gone = Job.new("t", TrainOptions(), data, "gone-host").model_copy(
        update={"state": "running", "updated": time.time() - STALE_S - 1}
    )
    alive = Job.new("u", TrainOptions(), data, "other-host").model_copy(update={"state": "running"})
    await store.put(gone)
    await store.put(alive)
    await JobManager(settings, store, None, Metrics()).tick()
    failed = await store.get(gone.id)
    assert failed.state == "failed" and failed.finished
    assert failed.error.code == "replica_lost" and "gone-host" in failed.error.message
    assert (await store.get(alive.id)).state == "running"  # heard from recently: left alone


async def test_a_full_disk_while_unpacking_is_a_507_and_leaves_nothing(job_settings):
    from tests.server.test_storage_faults import small_tmpfs

    settings = job_settings()
    settings.home.mkdir(parents=True)
    empty = settings.home / "empty"
    empty.write_bytes(b"")
    with small_tmpfs(settings.home / "jobs", empty) as jobs:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as archive:  # stored: the bytes as they will unpack
            for c, (name, rgb) in enumerate(CLASSES.items()):
                for i in range(4):
                    archive.writestr(f"{name}/{i}.png", colour_png(rgb, seed=c * 10 + i, size=160))
        assert len(buf.getvalue()) > 300 * 1024  # more than the tmpfs holds
        async with serving(settings) as client:
            answer = await client.post("/tasks/full/train", content=buf.getvalue())
            assert answer.status_code == 507, answer.text
            assert answer.json()["error"]["code"] == "insufficient_storage"
            assert (await client.get("/jobs")).json() == {"jobs": []}
            assert [p.name for p in jobs.iterdir()] == ["empty"]  # nothing left behind
