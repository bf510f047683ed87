"""End to end over real HTTP: `piggy-serve` started as a user would, on a loopback port."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks import demo
from tests.server.server_support import TASKS, Reference, metric, png

STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command() -> list[str]:
    script = shutil.which("piggy-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "piggyback_serve.server"]


@contextmanager
def piggy_serve(tmp_path: Path, *args: str, open_files: int | None = None, **env: str):
    """`piggy-serve ARGS` on a free loopback port, ready; with `open_files`, under that
    limit of open files (soft and hard, as `ulimit -n` sets them)."""
    port = free_port()
    argv = ["prlimit", f"--nofile={open_files}:{open_files}"] if open_files else []
    argv += [*command(), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed in finally
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIGGY_")}
    # No gRPC unless a test asks for it (PIGGY_GRPC_PORT=...): every server would want 8001.
    environ.update(PIGGY_HOME=str(tmp_path / "home"), PIGGY_GRPC_PORT="0", **env)
    proc = subprocess.Popen(
        [*argv, *args],
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + STARTUP_S
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_console_script_serves_the_offline_answers(tmp_path, registry_dir, reference):
    env = dict(
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_REGISTRY=f"dir:{registry_dir}",
        PIGGY_ADMIN_TOKEN="t0ken",
    )
    with piggy_serve(tmp_path, **env) as client:
        for i, task in enumerate(TASKS):
            images = [png(300 + i), png(400 + i, size=(64, 33))]
            files = [("file", (f"{j}.png", img, "image/png")) for j, img in enumerate(images)]
            r = client.post(f"/predict?task={task}&top_k=3", files=files)
            assert r.status_code == 200, r.text
            for image, result in zip(images, r.json()["results"], strict=True):
                reference.check(task, image, result, top_k=3)

        data = (registry_dir / "alpha.safetensors").read_bytes()
        auth = {"Authorization": "Bearer t0ken"}
        assert client.put("/tasks/fresh", content=data).status_code == 401
        assert client.put("/tasks/fresh", content=data, headers=auth).status_code == 201
        image = png(500)
        r = client.post("/predict?task=fresh", content=image, headers={"content-type": "image/png"})
        reference.check("alpha", image, r.json()["results"][0])
        assert client.delete("/tasks/fresh", headers=auth).status_code == 204
        assert client.post("/predict?task=fresh", content=image).status_code == 404

        # Clients that go away mid-request harm nothing.
        host, port = client.base_url.host, client.base_url.port
        with socket.create_connection((host, port)) as raw:
            raw.sendall(
                b"POST /predict?task=beta HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: image/png\r\nContent-Length: 5000\r\n\r\n" + image[:100]
            )
        for _ in range(4):
            with pytest.raises(httpx.TimeoutException):
                client.post("/predict?task=beta", content=image, timeout=0.001)
        r = client.post("/predict?task=beta", content=image)
        assert r.status_code == 200
        reference.check("beta", image, r.json()["results"][0])

        text = client.get("/metrics").text
        assert (
            metric(text, "piggy_requests_total", route="/predict", status="200", task="beta") >= 2
        )
        assert "piggy_tasks_registered 4.0" in text


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_data_binary_without_a_content_type_is_classified(tmp_path, registry_dir, reference):
    """`curl --data-binary @photo.jpg` sends application/x-www-form-urlencoded: the bytes decide."""
    photo, notes = tmp_path / "photo.jpg", tmp_path / "notes.txt"
    Image.open(io.BytesIO(png(600))).convert("RGB").save(photo, format="JPEG")
    notes.write_text("not a photo\n")
    env = dict(
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_REGISTRY=f"dir:{registry_dir}",
    )
    with piggy_serve(tmp_path, **env) as client:
        url = f"{client.base_url}/predict?task=gamma"

        def curl(path: Path) -> tuple[int, dict]:
            done = subprocess.run(
                ["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}",
                 "--data-binary", f"@{path}", url],
                capture_output=True, text=True, timeout=90, check=True,
            )  # fmt: skip
            body, _, status = done.stdout.rpartition("\n")
            return int(status), json.loads(body)

        status, body = curl(photo)
        assert status == 200, body
        reference.check("gamma", photo.read_bytes(), body["results"][0])
        status, body = curl(notes)
        assert status == 415 and body["error"]["code"] == "unsupported_media_type"
        assert body["error"]["message"].endswith("the bytes look like text")


@pytest.mark.slow
@pytest.mark.skipif(
    not any(demo.BUNDLED_DIR.glob("*.safetensors")), reason="no bundled demo tasks built yet"
)
def test_demo_mode_installs_and_serves_the_demo_tasks(tmp_path):
    with piggy_serve(tmp_path, "--demo") as client:
        folder = demo.demo_tasks_dir(tmp_path / "home")
        installed = sorted(p.stem for p in folder.glob("*.safetensors"))
        assert installed == sorted(p.stem for p in demo.BUNDLED_DIR.glob("*.safetensors"))
        listing = client.get("/tasks").json()["tasks"]
        assert [t["name"] for t in listing] == installed
        reference = Reference(
            demo.load_demo_backbone(),
            {name: artifacts.read(folder / f"{name}.safetensors") for name in installed},
        )
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(png(600, size=(80, 60)))).convert("L").save(buf, format="PNG")
        for name in installed:
            r = client.post(f"/predict?task={name}&top_k=3", content=buf.getvalue())
            assert r.status_code == 200, r.text
            reference.check(name, buf.getvalue(), r.json()["results"][0], top_k=3)


def piggy(url: str, *args: str) -> subprocess.CompletedProcess:
    script = shutil.which("piggy", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "piggyback_serve.client"]
    env = {**os.environ, "PIGGY_URL": url, "PIGGY_TOKEN": "t0ken"}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=60)


def test_piggy_cli_against_the_server(tmp_path, registry_dir, reference):
    env = dict(
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_REGISTRY=f"dir:{registry_dir}",
        PIGGY_ADMIN_TOKEN="t0ken",
    )
    image = tmp_path / "img.png"
    image.write_bytes(png(700))
    with piggy_serve(tmp_path, **env) as client:
        url = str(client.base_url)
        listed = piggy(url, "tasks")
        assert listed.returncode == 0 and all(t in listed.stdout for t in TASKS)

        out = piggy(url, "predict", "--task", "gamma", "--top-k", "2", str(image))
        assert out.returncode == 0, out.stderr
        expected = reference.probs("gamma", image.read_bytes()).topk(2).indices.tolist()
        labels = [f"gamma-{i}" for i in expected]
        assert out.stdout.index(labels[0]) < out.stdout.index(labels[1])

        assert piggy(url, "upload", "copy", str(registry_dir / "delta.safetensors")).returncode == 0
        assert "copy" in piggy(url, "tasks").stdout
        assert piggy(url, "delete", "copy").returncode == 0
        missing = piggy(url, "predict", "--task", "copy", str(image))
        assert missing.returncode == 1 and "task_not_found" in missing.stderr


def test_busy_port_fails_at_once_with_one_clear_line(tmp_path, registry_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PIGGY_")}
        environ.update(
            PIGGY_HOME=str(tmp_path / "home"), PIGGY_BACKBONE="resnet18",
            PIGGY_BACKBONE_WEIGHTS="random", PIGGY_REGISTRY=f"dir:{registry_dir}",
        )  # fmt: skip
        out = subprocess.run(
            [*command(), "--host", "127.0.0.1", "--port", str(port)],
            env=environ, capture_output=True, text=True, timeout=STARTUP_S,
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"127.0.0.1:{port} is already in use" in lines[0]
    assert "--port" in lines[0] and "PIGGY_PORT" in lines[0]
    assert "Errno" not in out.stderr and "Traceback" not in out.stderr


def test_help_documents_the_exit_status():
    out = subprocess.run([*command(), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "exit status: 0 after a clean stop" in text
    assert "1 when the server cannot start (the listen address is in use" in text
