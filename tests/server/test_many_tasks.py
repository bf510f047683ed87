"""Many tasks on one server: open files do not grow with the task count."""

from __future__ import annotations

import dataclasses

import torch

from piggyback_serve.masks import artifact as artifacts
from tests.server.server_support import make_artifact, png
from tests.server.test_e2e import piggy_serve

OPEN_FILES = 256
TASK_COUNT = 300  # more tasks than open files


def test_more_tasks_than_open_files_all_serve(tmp_path, backbone):
    base = make_artifact(backbone, "many", n_labels=3, seed=5, keep=0.9999)
    folder = tmp_path / "tasks"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(TASK_COUNT):  # distinct heads, so each answer names its own task
        head = torch.randn(base.head_weight.shape, generator=g)
        labels = [f"t{i:03d}-{k}" for k in range(3)]
        art = dataclasses.replace(base, task=f"t{i:03d}", labels=labels, head_weight=head)
        (folder / f"t{i:03d}.safetensors").write_bytes(artifacts.to_bytes(art))
    env = dict(
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_REGISTRY=f"dir:{folder}",
        PIGGY_ENGINE_WORKERS="1",
    )
    with piggy_serve(tmp_path, open_files=OPEN_FILES, **env) as client:
        assert len(client.get("/tasks").json()["tasks"]) == TASK_COUNT
        image = png(1)
        for i in range(TASK_COUNT):
            answer = client.post(
                f"/predict?task=t{i:03d}", content=image, headers={"content-type": "image/png"}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0]["top"][0]["label"].startswith(f"t{i:03d}-")
