"""Fixtures for the server tests (helpers live in server_support.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from server_support import BACKBONE, TASKS, Reference, make_artifact, settings_for

from masks import artifact as artifacts
from masks.backbones import Backbone, load_backbone
from server.settings import Settings


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return load_backbone(BACKBONE, "random")


@pytest.fixture(scope="session")
def task_files(tmp_path_factory, backbone) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("artifacts")
    return {
        name: artifacts.write(
            make_artifact(backbone, name, n_labels=4 + i, seed=i), folder / f"{name}.safetensors"
        )
        for i, name in enumerate(TASKS)
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
def anyio_backend():
    return "asyncio"


@pytest.fixture
def settings(tmp_path, registry_dir) -> Settings:
    return settings_for(tmp_path, registry_dir)
