"""A registry that cannot store: a full disk and a read-only folder answer 507
`insufficient_storage`, leave nothing half-written, keep the old task serving, and keep
the connection usable (docs/serving.md, "Errors")."""

from __future__ import annotations

import http.client
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from piggyback_serve.client import errors as client_errors
from piggyback_serve.server.catalog import insufficient
from piggyback_serve.server.errors import InsufficientStorage, rebuilt
from piggyback_serve.server.registry import StorageError
from piggyback_serve.server.registry.dir import ID_FILE
from tests.server.server_support import metric, png, serving, settings_for
from tests.server.test_e2e import piggy_serve

pytestmark = pytest.mark.anyio

SLACK = 200 * 1024  # room left on the tmpfs once the old artifact is on it: too little
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def small_tmpfs(path: Path, old: Path):
    """A tmpfs at `path` holding `old` and SLACK bytes more; unmounted after."""
    path.mkdir()
    size = old.stat().st_size + SLACK
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        shutil.copy(old, path / old.name)
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def read_only(path: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")


def labels_of(answer: dict) -> set[str]:
    return {s["label"].split("-")[0] for r in answer["results"] for s in r["top"]}


async def test_a_full_disk_is_a_507_and_the_old_task_serves(tmp_path, task_files):
    with small_tmpfs(tmp_path / "full", task_files["alpha"]) as folder:
        settings = settings_for(tmp_path, folder, admin_token=TOKEN)
        async with serving(settings) as client:
            r = await client.put(
                "/tasks/alpha", content=task_files["beta"].read_bytes(), headers=AUTH
            )
            assert r.status_code == 507, r.text
            error = r.json()["error"]
            assert error["code"] == "insufficient_storage"
            assert f"dir:{folder}" in error["message"] and "free space" in error["message"]
            # Nothing half-written, and the old version still answers.
            assert [p.name for p in folder.iterdir() if p.name != ID_FILE] == ["alpha.safetensors"]
            r = await client.post("/predict?task=alpha", content=png(1))
            assert r.status_code == 200 and labels_of(r.json()) == {"alpha"}
            text = (await client.get("/metrics")).text
            assert metric(text, "piggy_registry_write_errors_total", reason="no_space") == 1
            assert metric(text, "piggy_errors_total", code="insufficient_storage") == 1


async def test_a_read_only_folder_is_a_507_for_uploads_and_deletes(tmp_path, task_files):
    with small_tmpfs(tmp_path / "ro", task_files["alpha"]) as folder:
        read_only(folder)
        settings = settings_for(tmp_path, folder, admin_token=TOKEN)
        async with serving(settings) as client:
            small = task_files["beta"].read_bytes()
            for r in (
                await client.put("/tasks/beta", content=small, headers=AUTH),
                await client.delete("/tasks/alpha", headers=AUTH),
            ):
                assert r.status_code == 507, r.text
                assert r.json()["error"]["code"] == "insufficient_storage"
                assert "read-write" in r.json()["error"]["message"]
            assert (await client.post("/predict?task=alpha", content=png(2))).status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, "piggy_registry_write_errors_total", reason="read_only") == 2
            spec = (await client.get("/openapi.json")).json()["paths"]["/tasks/{name}"]
            assert "507" in spec["put"]["responses"] and "507" in spec["delete"]["responses"]


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_the_connection_stays_usable_after_a_507(tmp_path, task_files, frontends):
    """Over real TCP: the 507 and a prediction after it on one keep-alive connection; with
    front ends, the engine service's refusal answered and counted by the front end."""
    with small_tmpfs(tmp_path / "full", task_files["alpha"]) as folder:
        env = dict(
            PIGGY_BACKBONE="resnet18",
            PIGGY_BACKBONE_WEIGHTS="random",
            PIGGY_REGISTRY=f"dir:{folder}",
            PIGGY_ADMIN_TOKEN=TOKEN,
            PIGGY_FRONTENDS=frontends,
        )
        with piggy_serve(tmp_path, **env) as client:
            url = client.base_url
            conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
            try:
                body = task_files["beta"].read_bytes()
                conn.request("PUT", "/tasks/alpha", body=body, headers=AUTH)
                r = conn.getresponse()
                assert r.status == 507 and b"insufficient_storage" in r.read()
                sock = conn.sock
                assert sock is not None and r.getheader("connection") != "close"
                conn.request("POST", "/predict?task=alpha", body=png(3))
                r = conn.getresponse()
                assert r.status == 200, r.read()
                r.read()
                assert conn.sock is sock  # the same connection, not a new one
            finally:
                conn.close()
            assert [p.name for p in folder.iterdir() if p.name != ID_FILE] == ["alpha.safetensors"]
            text = client.get("/metrics").text
            assert metric(text, "piggy_registry_write_errors_total", reason="no_space") == 1


def test_the_reason_crosses_from_the_engine_service():
    """A front end rebuilds the service's 507 with its reason (errors.rebuilt)."""
    cause = StorageError("dir:/srv/tasks", "read_only", "Read-only file system")
    sent = insufficient(cause, "cannot store task 'x'")
    again = rebuilt(sent.status, sent.code, sent.message, sent.headers, sent.reason)
    assert isinstance(again, InsufficientStorage) and again.reason == "read_only"
    assert again.status == 507 and again.message == sent.message


def test_the_client_raises_insufficient_storage_for_a_507():
    error = client_errors.api_error(507, "insufficient_storage", "registry dir:/x cannot store")
    assert isinstance(error, client_errors.InsufficientStorage) and error.status == 507
    assert not isinstance(error, client_errors.Unavailable)  # 503s are retried; 507s not
