"""server/catalog.py: tasks listed from their headers, states built on first use and kept
in a bounded host tier, an artifact found invalid only then reported."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from piggyback_serve.masks import artifact as artifacts
from tests.server.server_support import TASKS, make_artifact, metric, png, serving, settings_for

pytestmark = pytest.mark.anyio


async def predict(client, task: str, image: bytes):
    return await client.post(
        f"/predict?task={task}", content=image, headers={"content-type": "image/png"}
    )


async def test_tasks_are_listed_from_headers_and_built_on_first_use(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["tasks"] == len(TASKS) and ready["tasks_loaded"] == 0
        listed = (await client.get("/tasks")).json()["tasks"]
        assert sorted(t["name"] for t in listed) == sorted(TASKS)  # labels etc. from headers
        image = png(11)
        r = await predict(client, "alpha", image)
        assert r.status_code == 200, r.text
        reference.check("alpha", image, r.json()["results"][0])
        assert (await client.get("/readyz")).json()["tasks_loaded"] == 1
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_tier_misses_total", tier="host") == 1
        await predict(client, "alpha", image)
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_tier_hits_total", tier="host") == 1


async def test_past_the_host_budget_states_are_evicted_and_answers_stay_right(
    tmp_path, registry_dir, backbone, reference
):
    # A budget below one state: only the state in use stays, every switch evicts.
    settings = settings_for(tmp_path, registry_dir, host_state_bytes=1)
    images = [png(30 + i) for i in range(len(TASKS))]
    async with serving(settings, backbone) as client:
        for _ in range(2):
            for task, image in zip(TASKS, images, strict=True):
                r = await predict(client, task, image)
                assert r.status_code == 200, r.text
                reference.check(task, image, r.json()["results"][0])
        catalog = client.app.state.services.catalog
        assert len(catalog.host.states) == 1
        text = (await client.get("/metrics")).text
        assert metric(text, "piggy_tier_evictions_total", tier="host") == 2 * len(TASKS) - 1
        assert metric(text, "piggy_tier_misses_total", tier="host") == 2 * len(TASKS)
        assert metric(text, "piggy_tier_tasks", tier="host") == 1


async def test_an_artifact_invalid_past_its_header_is_reported(
    tmp_path, registry_dir, backbone, settings
):
    # The header is fine (labels, backbone, fingerprint, head rows); the head's columns do
    # not fit the backbone, which only the full check sees.
    good = make_artifact(backbone, "odd", n_labels=3, seed=9)
    odd = dataclasses.replace(good, head_weight=torch.zeros(3, 7))
    (registry_dir / "odd.safetensors").write_bytes(artifacts.to_bytes(odd))
    async with serving(settings, backbone) as client:
        assert "odd" in [t["name"] for t in (await client.get("/tasks")).json()["tasks"]]
        r = await predict(client, "odd", png(1))
        assert r.status_code == 422, r.text
        assert "head.weight" in r.json()["error"]["message"]
        ready = await client.get("/readyz")
        assert ready.status_code == 200  # the registry was read whole; one task is bad
        assert ready.json()["tasks_failed"] == 1 and "head.weight" in ready.json()["failed"]["odd"]
        r = await predict(client, "odd", png(1))
        assert r.status_code == 404 and "invalid artifact" in r.json()["error"]["message"]
        assert "odd" not in [t["name"] for t in (await client.get("/tasks")).json()["tasks"]]
        assert (await predict(client, "alpha", png(1))).status_code == 200


async def test_a_registry_not_read_whole_is_not_ready(settings, backbone, monkeypatch):
    async with serving(settings, backbone) as client:
        catalog = client.app.state.services.catalog
        registry = catalog.registry

        async def out_of_files(name):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(registry, "read_header", out_of_files)
        monkeypatch.setattr(catalog, "tasks", {})  # as if the start had stopped half-way
        await catalog.refresh()
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert "out of open files" in r.json()["error"]["message"]
