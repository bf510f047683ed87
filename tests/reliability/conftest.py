"""Fixtures for the reliability and security tests: the server tests' helpers
(tests/server/server_support.py), two small tasks on a random resnet18 at 32 px."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

from server_support import BACKBONE, Reference, make_artifact, settings_for  # noqa: E402

from masks import artifact as artifacts  # noqa: E402
from masks.backbones import Backbone, load_backbone  # noqa: E402
from server.settings import Settings  # noqa: E402

TASKS = ("alpha", "beta")


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return load_backbone(BACKBONE, "random")


@pytest.fixture(scope="session")
def task_files(tmp_path_factory, backbone) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reliability-artifacts")
    return {
        name: artifacts.write(
            make_artifact(backbone, name, n_labels=4 + i, seed=i), folder / f"{name}.safetensors"
        )
        for i, name in enumerate(TASKS)
    }


@pytest.fixture(scope="session")
def reference(task_files) -> Reference:
    own = load_backbone(BACKBONE, "random")  # not the server's: its engine thread uses that one
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
