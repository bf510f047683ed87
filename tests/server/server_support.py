"""Helpers for the server tests: a small random backbone, hand-made task artifacts,
reference predictions computed offline with masks.inference, and an in-process client."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from piggyback_serve.masks import inference
from piggyback_serve.masks.artifact import TaskArtifact, pack_mask
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.masks.data import to_tensor
from piggyback_serve.server.app import create_app
from piggyback_serve.server.settings import Settings

BACKBONE = "resnet18"  # random-init (seeded), so tests need no weights and no network
INPUT_SIZE = 32
TASKS = ("alpha", "beta", "gamma", "delta")


def make_artifact(
    backbone: Backbone,
    task: str,
    n_labels: int = 5,
    seed: int = 0,
    input_size: int = INPUT_SIZE,
    keep: float = 0.9,
    description: str = "",
) -> TaskArtifact:
    """A valid artifact with random masks and head; labels are prefixed by the task name."""
    g = torch.Generator().manual_seed(seed)
    masks = {
        name: pack_mask(torch.rand(w.shape, generator=g) < keep)
        for name, w in backbone.maskable().items()
    }
    head = torch.randn(n_labels, backbone.num_features, generator=g)
    return TaskArtifact(
        task=task,
        backbone=backbone.name,
        backbone_sha256=backbone.fingerprint,
        labels=[f"{task}-{i}" for i in range(n_labels)],
        masks=masks,
        head_weight=head / backbone.num_features**0.5,
        head_bias=torch.zeros(n_labels),
        threshold=5e-3,
        input_size=input_size,
        mean=backbone.mean,
        std=backbone.std,
        metrics={"accuracy": 0.5, "sparsity": 1 - keep, "dataset": "synthetic"},
        description=description,
    )


def png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Reference:
    """Offline answers: the masked model run directly, no server involved."""

    backbone: Backbone
    artifacts: dict[str, TaskArtifact]
    _params: dict = field(default_factory=dict)

    def probs(self, task: str, image: bytes) -> torch.Tensor:
        art = self.artifacts[task]
        x = to_tensor(Image.open(io.BytesIO(image)), art.input_size, art.mean, art.std)
        with torch.inference_mode():
            if task not in self._params:
                self._params[task] = inference.materialise(art, self.backbone)
            logits = inference.forward(self.backbone, self._params[task], x[None])
            return torch.softmax(logits, -1)[0]

    def check(self, task: str, image: bytes, result: dict, top_k: int = 5) -> None:
        """Same top-k labels as offline, probabilities within 1e-5."""
        expected = self.probs(task, image)
        assert len(result["top"]) == min(top_k, len(expected))
        scores, indices = expected.topk(len(result["top"]))
        labels = self.artifacts[task].labels
        assert [t["label"] for t in result["top"]] == [labels[i] for i in indices.tolist()]
        got = torch.tensor([t["score"] for t in result["top"]])
        assert torch.allclose(got, scores, atol=1e-5, rtol=0), (got, scores)


def settings_for(home: Path, registry: Path, **overrides) -> Settings:
    values = dict(
        home=home,
        registry=f"dir:{registry}",
        backbone=BACKBONE,
        backbone_weights="random",
        device="cpu",
        max_delay_ms=2,
        registry_rescan_s=0.2,
        grpc_port=0,  # no gRPC unless a test asks: test servers would all want 8001
    )
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serving(settings: Settings, backbone: Backbone | None = None):
    """An app run in-process (lifespan included) and an httpx client talking to it."""
    app = create_app(settings, backbone)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://piggy") as client:
            await wait_ready(client)
            client.app = app
            yield client


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not ready after {timeout_s}s: {(await client.get('/readyz')).text}")


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions in a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Blocked:
    """Every engine worker claimed, as if each ran a batch, until `set()` (on the loop)."""

    def __init__(self, pool):
        self.pool = pool
        self.claimed = [pool._claim(None) for _ in range(pool.alive)]
        assert all(self.claimed), "a worker was busy already"

    def set(self) -> None:
        for handle in self.claimed:
            self.pool._release(handle, handle.pending[0])


def blocked_engine(client) -> Blocked:
    """Occupy every engine worker until the returned object's `set()`."""
    return Blocked(client.app.state.services.engine)


async def until(predicate, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def registry_fixtures(tasks: tuple[str, ...], folder_name: str):
    """The fixtures every server-side test folder needs, over its own task names.

    A conftest binds them by name: `backbone, task_files, reference, registry_dir,
    settings, anyio_backend = registry_fixtures(TASKS, "artifacts")`.
    """
    import shutil

    import pytest

    from piggyback_serve.masks import artifact as artifacts
    from piggyback_serve.masks.backbones import load_backbone

    @pytest.fixture(scope="session")
    def backbone() -> Backbone:
        return load_backbone(BACKBONE, "random")

    @pytest.fixture(scope="session")
    def task_files(tmp_path_factory, backbone) -> dict[str, Path]:
        folder = tmp_path_factory.mktemp(folder_name)
        return {
            name: artifacts.write(
                make_artifact(backbone, name, n_labels=4 + i, seed=i),
                folder / f"{name}.safetensors",
            )
            for i, name in enumerate(tasks)
        }

    @pytest.fixture(scope="session")
    def reference(task_files) -> Reference:
        # Its own backbone instance: the server's engine thread may be using the shared one.
        own = load_backbone(BACKBONE, "random")
        return Reference(own, {name: artifacts.read(path) for name, path in task_files.items()})

    @pytest.fixture
    def registry_dir(tmp_path, task_files) -> Path:
        folder = tmp_path / "tasks"
        folder.mkdir()
        for path in task_files.values():
            shutil.copy(path, folder / path.name)
        return folder

    @pytest.fixture
    def settings(tmp_path, registry_dir) -> Settings:
        return settings_for(tmp_path, registry_dir)

    @pytest.fixture
    def anyio_backend():
        return "asyncio"

    return backbone, task_files, reference, registry_dir, settings, anyio_backend
