"""A real server on a loopback port for the client, OIP and page tests.

uvicorn runs the app in a thread of the test process (no subprocess start-up cost), on the
small random resnet18 backbone of tests/server. Imported by the conftests of tests/client,
tests/oip and tests/web, which share these fixtures.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.server.app import create_app
from tests.server.server_support import BACKBONE, Reference, make_artifact, png, settings_for

TOKEN = "t0ken"
LABELS = {"alpha": 5, "beta": 7}  # task name -> number of labels

__all__ = ["Live", "live", "live_artifacts", "png", "TOKEN", "LABELS"]


@dataclass
class Live:
    url: str
    registry: Path
    artifacts: dict[str, Path]  # task name -> a copy of its artifact outside the registry
    reference: Reference


@contextmanager
def running(app, startup_s: float = 60) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve([sock])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def live_artifacts(tmp_path_factory) -> dict[str, Path]:
    backbone = load_backbone(BACKBONE, "random")
    folder = tmp_path_factory.mktemp("live_artifacts")
    return {
        name: artifacts.write(
            make_artifact(backbone, name, n_labels=n, seed=10 + i), folder / f"{name}.safetensors"
        )
        for i, (name, n) in enumerate(LABELS.items())
    }


@pytest.fixture(scope="session")
def live(tmp_path_factory, live_artifacts) -> Iterator[Live]:
    """One server per test folder, admin token TOKEN, tasks `alpha` and `beta`."""
    home = tmp_path_factory.mktemp("live_home")
    registry = home / "tasks"
    registry.mkdir()
    for path in live_artifacts.values():
        shutil.copy(path, registry / path.name)
    settings = settings_for(home, registry, admin_token=TOKEN)
    reference = Reference(
        load_backbone(BACKBONE, "random"),
        {name: artifacts.read(path) for name, path in live_artifacts.items()},
    )
    with running(create_app(settings)) as url:
        yield Live(url, registry, live_artifacts, reference)
