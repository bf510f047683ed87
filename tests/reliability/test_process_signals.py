"""The real process: SIGTERM under load drains and exits 0; kill -9 during an upload to the
folder registry leaves the old artifact or the new one, never a broken file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from piggyback_serve.masks import artifact as artifacts
from tests.server.server_support import make_artifact, metric, png
from tests.server.test_e2e import command, free_port

pytestmark = pytest.mark.slow
TOKEN = "sigterm-adm1n-t0ken"


@contextmanager
def started(tmp_path: Path, registry: Path, **env: str):
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIGGY_")}
    environ.update(
        PIGGY_HOME=str(tmp_path / "home"), PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random", PIGGY_REGISTRY=f"dir:{registry}",
        PIGGY_ADMIN_TOKEN=TOKEN, **env,
    )  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*command(), "--host", "127.0.0.1", "--port", str(port), "--log-level", "debug"],
            env=environ, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            yield proc, url, log_path
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_sigterm_under_load_drains_refuses_new_and_exits_0(tmp_path, registry_dir, reference):
    # Batches wait 1.5 s to fill, so the requests are surely in flight at the signal.
    with started(tmp_path, registry_dir, PIGGY_MAX_DELAY_MS="1500", PIGGY_MAX_BATCH_SIZE="64") as (
        proc, url, log_path,
    ):  # fmt: skip
        auth = {"Authorization": f"Bearer {TOKEN}"}
        data = (registry_dir / "beta.safetensors").read_bytes()
        assert (
            httpx.put(
                f"{url}/tasks/copy", content=b"x", headers={"Authorization": "Bearer x"}
            ).status_code
            == 403
        )  # noqa: E501
        assert httpx.put(f"{url}/tasks/copy", content=data, headers=auth).status_code == 201
        images = [png(3000 + i) for i in range(6)]
        answers: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            answers[i] = httpx.post(
                f"{url}/predict?task=alpha", content=images[i],
                headers={"content-type": "image/png"}, timeout=30,
            )  # fmt: skip

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while metric(httpx.get(f"{url}/metrics").text, "piggy_queue_depth") < len(images):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # listening socket closed: refused
            httpx.post(f"{url}/predict?task=alpha", content=images[0], timeout=5)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0, log_path.read_text()
    for i, image in enumerate(images):
        assert answers[i].status_code == 200, answers[i].text
        reference.check("alpha", image, answers[i].json()["results"][0])
    log = log_path.read_text()
    assert "Shutting down" in log or "shutdown" in log.lower()
    assert TOKEN not in log  # debug logging, an upload and a refused token: never logged


def test_kill_9_during_an_upload_leaves_old_or_new_never_broken(
    tmp_path, registry_dir, backbone, reference
):
    old = (registry_dir / "alpha.safetensors").read_bytes()
    new = artifacts.to_bytes(make_artifact(backbone, "alpha", n_labels=4, seed=77))
    target = registry_dir / "alpha.safetensors"
    outcomes = []
    # Killed while the body streams in, as the upload starts, and 50 ms into it (around
    # validation, the write and the rename on this machine).
    for stage, delay in (("mid-body", None), ("at once", 0.0), ("after 50 ms", 0.05)):
        with started(tmp_path, registry_dir) as (proc, url, _):

            def body(stage=stage, proc=proc):
                for at in range(0, len(new), 64 * 1024):
                    if stage == "mid-body" and at >= len(new) // 2:
                        proc.kill()
                        time.sleep(0.2)
                    yield new[at : at + 64 * 1024]

            def upload(url=url, body=body):
                with contextlib.suppress(httpx.TransportError):
                    httpx.put(f"{url}/tasks/alpha", content=body(),
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)  # fmt: skip

            thread = threading.Thread(target=upload)
            thread.start()
            if delay is not None:
                time.sleep(delay)
                proc.kill()
            thread.join(15)
            proc.wait()
        now = target.read_bytes()
        assert now in (old, new), stage
        outcomes.append((stage, "new" if now == new else "old"))
        visible = [p for p in registry_dir.iterdir() if not p.name.startswith(".")]
        for path in visible:  # every file the registry would serve is whole
            artifacts.read(path)
    # After a restart the task serves, with the weights of whichever version is on disk.
    with started(tmp_path, registry_dir) as (_, url, _):
        image = png(4000)
        r = httpx.post(f"{url}/predict?task=alpha", content=image)
        assert r.status_code == 200, r.text
        if target.read_bytes() == old:
            reference.check("alpha", image, r.json()["results"][0])
    print("kill -9 outcomes:", outcomes)


def _jpeg(seed: int, side: int = 1070) -> bytes:
    """Noise at quality 95: about 1.35 MB, so the body takes several reads to arrive."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_sigterm_answers_every_request_it_accepted(tmp_path, registry_dir):
    """40 large JPEGs sent 20 ms apart, SIGTERM 0.5 s in: each request is answered or
    refused, never read and then dropped ("Server disconnected without sending a response")."""
    image = _jpeg(0)
    assert 1_200_000 < len(image) < 1_500_000
    with started(tmp_path, registry_dir) as (proc, url, log_path):
        outcomes: dict[int, object] = {}

        def send(i: int) -> None:
            try:
                outcomes[i] = httpx.post(
                    f"{url}/predict?task=alpha", content=image,
                    headers={"content-type": "image/jpeg"}, timeout=60,
                ).status_code  # fmt: skip
            except httpx.TransportError as exc:
                outcomes[i] = exc

        threads, start, signalled = [], time.monotonic(), False
        for i in range(40):
            if not signalled and time.monotonic() - start >= 0.5:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            threads.append(threading.Thread(target=send, args=(i,)))
            threads[-1].start()
            time.sleep(0.02)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0, log_path.read_text()
    dropped = {i: o for i, o in outcomes.items() if isinstance(o, httpx.RemoteProtocolError)}
    assert not dropped, (dropped, outcomes)
    answered = [o for o in outcomes.values() if isinstance(o, int)]
    refused = [o for o in outcomes.values() if isinstance(o, httpx.ConnectError)]
    assert answered and all(code == 200 for code in answered), outcomes
    others = [o for o in outcomes.values() if not isinstance(o, int | httpx.ConnectError)]
    print("answered", len(answered), "refused", len(refused), "other", others)


def _post(sock: socket.socket, image: bytes) -> tuple[int, dict[str, str]]:
    """One POST /predict over a raw connection: (status, headers), the body read whole."""
    head = (
        "POST /predict?task=alpha HTTP/1.1\r\nHost: piggy\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(image)}\r\n\r\n"
    )
    sock.sendall(head.encode() + image)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer (got {data!r})"
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    return int(status.split()[1]), headers


def test_sigterm_answers_requests_on_connections_already_open(tmp_path, registry_dir):
    """uvicorn alone closes, at SIGTERM, every connection with no request in hand: a client
    that has just connected, or reuses a keep-alive connection, sends its request into a
    closed connection. Here such a request is answered (Connection: close)."""
    with started(tmp_path, registry_dir) as (proc, url, log_path):
        port = int(url.rsplit(":", 1)[1])
        fresh = socket.create_connection(("127.0.0.1", port), timeout=30)
        kept = socket.create_connection(("127.0.0.1", port), timeout=30)
        with fresh, kept:
            assert _post(kept, png(1))[0] == 200  # kept alive, idle now
            time.sleep(0.3)  # the idle loop has accepted `fresh`
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while True:  # the listening socket closes with the shutdown of every connection
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.02)
            time.sleep(0.1)
            for sock in (fresh, kept):
                status, headers = _post(sock, png(2))
                assert status == 200 and headers.get("connection") == "close", headers
                assert sock.recv(1) == b""  # then closed
        assert proc.wait(30) == 0, log_path.read_text()
