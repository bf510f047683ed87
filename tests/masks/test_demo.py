import os
import subprocess
import sys

import pytest
import torch

from piggyback_serve.masks import artifact, data, demo, inference
from piggyback_serve.masks.errors import ArtifactError

BUNDLED = sorted(demo.BUNDLED_DIR.glob("*.safetensors"))


def test_demo_tasks_are_bundled_and_small():
    names = {p.stem for p in BUNDLED}
    assert {"mnist", "digits", "faces"} <= names
    assert all(p.stat().st_size < 1_000_000 for p in BUNDLED)


def test_bundled_tasks_carry_the_descriptions_a_rebuild_writes():
    # demo.build writes each DemoTask's description: a rebuild and the bundle agree.
    descriptions = {t.name: t.description for t in demo.DEMO_TASKS}
    for path in BUNDLED:
        description = artifact.read(path).description
        assert description == descriptions[path.stem]
        assert artifact.check_description(description) == description


@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_task_reaches_its_recorded_accuracy(path, lite0):
    art = artifact.load(path, lite0)
    dataset_name = art.metrics["dataset"]
    if dataset_name == "fashion_mnist" and not data.fashion_mnist_available():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    test = data.preprocess_all(
        data.load_dataset(dataset_name).test, art.input_size, art.mean, art.std
    )
    params = inference.materialise(art, lite0)
    correct = 0
    with torch.inference_mode():
        for x, y in torch.utils.data.DataLoader(test, batch_size=250):
            correct += (inference.forward(lite0, params, x).argmax(1) == y).sum().item()
    accuracy = correct / len(test)
    assert abs(accuracy - art.metrics["accuracy"]) <= 0.005
    assert accuracy > 0.8


def test_demo_command_installs_validated_tasks(tmp_path):
    env = {**os.environ, "PIGGY_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "piggyback_serve.masks", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    installed = sorted(p.name for p in (tmp_path / "demo" / "tasks").glob("*.safetensors"))
    assert installed == [p.name for p in BUNDLED]
    assert "mnist" in out.stdout and "%" in out.stdout


def test_demo_table_lists_each_served_task_once_and_marks_uploads(tmp_path):
    # --demo mode: uploads land in the demo folder, stored under the name they were PUT as.
    folder = tmp_path / "tasks"
    folder.mkdir()
    for path in BUNDLED:
        (folder / path.name).write_bytes(path.read_bytes())
    mnist = (demo.BUNDLED_DIR / "mnist.safetensors").read_bytes()
    (folder / "mine.safetensors").write_bytes(mnist)  # PUT /tasks/mine, its own name mnist
    (folder / "yours.safetensors").write_bytes(mnist)
    rows = [line.split("|")[1:3] for line in demo.table_from_artifacts(folder).splitlines()[2:]]
    names = [name.strip() for name, _ in rows]
    assert sorted(names) == sorted([p.stem for p in BUNDLED] + ["mine", "yours"])
    sources = {name.strip(): source.strip() for name, source in rows}
    assert sources["mine"] == sources["yours"] == "upload"
    assert all(sources[p.stem] == "demo" for p in BUNDLED)


def test_install_refuses_tasks_of_another_backbone(tmp_path, lite0):
    foreign = artifact.read(BUNDLED[0])
    foreign.backbone_sha256 = "f" * 64
    source = tmp_path / "src"
    artifact.write(foreign, source / BUNDLED[0].name)
    with pytest.raises(ArtifactError) as err:
        demo.install(tmp_path / "dest", lite0, source=source)
    assert err.value.field == "backbone_sha256"
    assert not list((tmp_path / "dest").glob("*.safetensors"))
