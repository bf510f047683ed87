"""The task lifecycle: upload, serve, replace, delete; the folder changed by others."""

import shutil

import pytest

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.server.registry.dir import ID_FILE
from tests.server.server_support import make_artifact, png, serving, until

pytestmark = pytest.mark.anyio


async def test_put_predict_delete_then_404(settings, registry_dir, backbone, reference):
    data = (registry_dir / "gamma.safetensors").read_bytes()
    image = png(11)
    async with serving(settings, backbone) as client:
        r = await client.put(
            "/tasks/uploaded", content=data, headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "uploaded" and r.json()["size_bytes"] == len(data)
        assert (registry_dir / "uploaded.safetensors").read_bytes() == data
        temps = [p for p in registry_dir.iterdir() if p.name.endswith(".tmp")]
        assert not temps and (registry_dir / ID_FILE).exists()  # no temp left, an identity

        r = await client.post("/predict?task=uploaded", content=image)
        assert r.status_code == 200 and r.json()["task"] == "uploaded"
        reference.check("gamma", image, r.json()["results"][0])  # same artifact as gamma

        assert (await client.delete("/tasks/uploaded")).status_code == 204
        assert not (registry_dir / "uploaded.safetensors").exists()
        r = await client.post("/predict?task=uploaded", content=image)
        assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        assert (await client.delete("/tasks/uploaded")).status_code == 404


async def test_replacing_a_task_serves_the_new_weights(settings, registry_dir, backbone, reference):
    image = png(12)
    async with serving(settings, backbone) as client:
        first = (await client.post("/predict?task=alpha", content=image)).json()
        reference.check("alpha", image, first["results"][0])
        data = (registry_dir / "beta.safetensors").read_bytes()
        assert (await client.put("/tasks/alpha", content=data)).status_code == 201
        second = (await client.post("/predict?task=alpha", content=image)).json()
        reference.check("beta", image, second["results"][0])


async def test_files_added_and_removed_by_another_process(
    settings, registry_dir, task_files, backbone, reference
):
    image = png(13)
    async with serving(settings, backbone) as client:
        shutil.copy(task_files["delta"], registry_dir / "late.safetensors")
        catalog = client.app.state.services.catalog
        # Served after the next rescan (PIGGY_REGISTRY_RESCAN_S); a miss never waits for one.
        await until(lambda: "late" in catalog.tasks, timeout_s=5)
        r = await client.post("/predict?task=late", content=image)
        assert r.status_code == 200, r.text
        reference.check("delta", image, r.json()["results"][0])

        (registry_dir / "beta.safetensors").unlink()
        await until(lambda: "beta" not in catalog.tasks, timeout_s=5)
        assert (await client.post("/predict?task=beta", content=image)).status_code == 404
        names = [t["name"] for t in (await client.get("/tasks")).json()["tasks"]]
        assert "beta" not in names and "late" in names


async def test_a_bad_file_in_the_folder_is_skipped_not_fatal(
    settings, registry_dir, backbone, reference
):
    foreign = make_artifact(backbone, "foreign", seed=3)
    foreign.backbone_sha256 = "f" * 64
    artifacts.write(foreign, registry_dir / "foreign.safetensors")
    (registry_dir / "junk.safetensors").write_bytes(b"not an artifact")
    (registry_dir / "not a task.safetensors").write_bytes(b"ignored: invalid name")
    async with serving(settings, backbone) as client:
        names = [t["name"] for t in (await client.get("/tasks")).json()["tasks"]]
        assert names == ["alpha", "beta", "delta", "gamma"]
        assert (await client.post("/predict?task=foreign", content=png(1))).status_code == 404
        image = png(14)
        r = await client.post("/predict?task=alpha", content=image)
        reference.check("alpha", image, r.json()["results"][0])


async def test_the_url_names_the_task_not_the_artifact(settings, registry_dir, backbone):
    data = artifacts.to_bytes(make_artifact(backbone, "inner-name", seed=5))
    async with serving(settings, backbone) as client:
        assert (await client.put("/tasks/outer", content=data)).status_code == 201
        assert (await client.get("/tasks/outer")).json()["name"] == "outer"
        assert (await client.get("/tasks/inner-name")).status_code == 404


async def test_an_upload_says_which_name_it_is_served_under(settings, registry_dir, backbone):
    data = artifacts.to_bytes(make_artifact(backbone, "inner-name", seed=5))
    async with serving(settings, backbone) as client:
        r = await client.put("/tasks/outer", content=data)
        assert r.status_code == 201
        assert r.json()["name"] == "outer" and r.json()["artifact_task"] == "inner-name"
        listed = {t["name"]: t for t in (await client.get("/tasks")).json()["tasks"]}
        assert listed["outer"]["artifact_task"] == "inner-name"


async def test_tasks_carry_the_artifacts_description(settings, backbone):
    said = "A close-up photo of one flower, petals visible"
    data = artifacts.to_bytes(make_artifact(backbone, "flowers", seed=6, description=said))
    async with serving(settings, backbone) as client:
        r = await client.put("/tasks/flowers", content=data)
        assert r.status_code == 201 and r.json()["description"] == said
        assert (await client.get("/tasks/flowers")).json()["description"] == said
        listed = {t["name"]: t for t in (await client.get("/tasks")).json()["tasks"]}
        assert listed["flowers"]["description"] == said
        assert listed["alpha"]["description"] == ""  # an artifact without one


@pytest.mark.parametrize("path", ["..%2Fetc", "a%2Fb", "..%2F..%2Fx", "%2E%2E", "a b"])
async def test_path_like_names_get_the_invalid_name_error(settings, backbone, path):
    async with serving(settings, backbone) as client:
        for method in ("GET", "PUT", "DELETE"):
            r = await client.request(method, f"/tasks/{path}", content=b"x")
            assert r.status_code == 400, (method, path, r.text)
            assert "invalid task name" in r.json()["error"]["message"]
        assert (await client.get("/tasks/nope")).status_code == 404  # valid name, no task


@pytest.mark.parametrize("token, admin", [(None, "open"), ("s3cret-token-xyz", "token")])
async def test_open_admin_routes_are_loud(tmp_path, registry_dir, backbone, caplog, token, admin):
    from tests.server.server_support import settings_for

    settings = settings_for(tmp_path / "home", registry_dir, admin_token=token)
    with caplog.at_level("WARNING", logger="piggy.serve"):
        async with serving(settings, backbone) as client:
            health = (await client.get("/healthz")).json()
    assert health == {"status": "ok", "admin": admin}  # no null fields
    warned = [r.message for r in caplog.records if "PIGGY_ADMIN_TOKEN is not set" in r.message]
    assert bool(warned) is (token is None)
