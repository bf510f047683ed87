import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from piggyback_serve.masks import artifact, cli, data, train
from piggyback_serve.masks.cli import main
from piggyback_serve.masks.device import resolve_device


@pytest.mark.slow
def test_short_piggyback_run_beats_chance(lite0):
    digits = data.digits()
    config = train.TrainConfig(epochs=1, min_steps=0, input_size=64, progress=False)
    result = train.train(lite0, digits, config)
    assert result.accuracy > 0.5  # chance is 0.1
    art = train.to_artifact(result, lite0, digits, config, "digits")
    artifact.validate(art, lite0)
    assert art.metrics["accuracy"] == pytest.approx(result.accuracy, abs=1e-6)
    assert 0 <= art.metrics["sparsity"] < 0.5


def test_baselines_train_on_the_same_split(lite0):
    faces = data.faces()
    costs = {}
    for mode in ("classifier-only", "finetune"):
        config = train.TrainConfig(mode=mode, epochs=2, min_steps=0, input_size=32, progress=False)
        result = train.train(lite0, faces, config)
        assert result.accuracy > 0.7, mode  # chance is 0.5
        costs[mode] = result.task_bytes
    assert costs["finetune"] > 1000 * costs["classifier-only"]


def test_split_is_stratified_and_deterministic():
    a, b = data.mnist(seed=0), data.mnist(seed=0)
    assert (a.test.targets == b.test.targets).all()
    counts = {int(c): int((a.test.targets == c).sum()) for c in range(10)}
    assert set(counts.values()) == {100}
    assert len(set(a.test.targets[:20])) > 3  # shuffled, not sorted by label


def test_image_folder_training_via_cli(tmp_path, capsys):
    from PIL import Image

    faces = data.faces()
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(zip(faces.train.images, faces.train.targets, strict=True)):
        (root / faces.labels[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / faces.labels[label] / f"{i}.png")
    out = tmp_path / "faces.safetensors"
    args = ["train", "--data", str(root), "--task", "faces", "--out", str(out)]
    described = ["--description", " a tight grayscale crop of one face "]
    threads = torch.get_num_threads()
    code = main([*args, *described, "--epochs", "1", "--min-steps", "0", "--input-size", "32"])
    assert code == 0
    assert torch.get_num_threads() == threads  # one thread while training, then as it was
    printed = capsys.readouterr()
    # The progress bars name the task, not the folder, for Piggyback and the comparison.
    assert "faces piggyback 1/1" in printed.err and "faces classifier-only 1/" in printed.err
    assert "folder piggyback" not in printed.err
    assert "warning: input 32 px is far below the 224 px" in printed.err
    assert "training piggyback on efficientnet_lite0: 120 training images" in printed.out
    assert "1 epoch = 4 steps (at least 0)" in printed.out
    # The size reported is the size of the file written (format 2), not format 1's bitmaps.
    assert f"{out.stat().st_size:,} bytes per task" in printed.out
    assert f"wrote {out} ({out.stat().st_size:,} bytes)" in printed.out
    # One epoch is 4 steps: no mask bit can flip, and the user is told so.
    assert "no weight was switched off" in printed.out
    assert "classifier-only: held-out accuracy" in printed.out
    assert "gain over classifier-only on the same split" in printed.out
    art = artifact.read(out)
    assert art.labels == ["face", "non-face"] and art.task == "faces"
    assert art.description == "a tight grayscale crop of one face"
    assert art.metrics["config"]["min_steps"] == 0
    inspect = subprocess.run(
        [sys.executable, "-m", "piggyback_serve.masks", "inspect", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "valid for backbone efficientnet_lite0" in inspect.stdout
    assert '"description": "a tight grayscale crop of one face"' in inspect.stdout


def test_artifact_records_the_epochs_the_step_floor_ran(lite0):
    full = data.faces()
    few = data.Split(full.train.images[:16], full.train.targets[:16])  # 1 step an epoch
    faces = replace(full, train=few, test=data.Split(full.test.images[:8], full.test.targets[:8]))
    config = train.TrainConfig(epochs=1, min_steps=2, batch_size=16, input_size=32, progress=False)
    assert "2 epochs = 2 steps (at least 2)" in train.settings_line(config, lite0, 16)
    result = train.train(lite0, faces, config)
    art = train.to_artifact(result, lite0, faces, config, "faces")
    assert art.metrics["config"]["epochs"] == 2 and art.metrics["config"]["min_steps"] == 2
    assert result.epochs == 2
    assert result.task_bytes == len(artifact.to_bytes(art))  # format 2's bytes, as written
    assert result.task_bytes < artifact.packed_size(art.metrics["masked_params"])


def test_settings_line_pluralises():
    one = train.TrainConfig(epochs=1, min_steps=0, batch_size=32)
    backbone = type("B", (), {"name": "b"})()
    assert "1 epoch = 1 step (at least 0)" in train.settings_line(one, backbone, 32)
    assert "1 epoch = 2 steps" in train.settings_line(one, backbone, 33)


def test_train_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = train.TrainConfig()
    for value in (d.epochs, d.min_steps, d.lr_mask, d.lr_head, d.threshold):
        assert f"(default: {value})" in text
    assert "(default: 32)" in text and "(default: auto)" in text and "(default: 1)" in text
    assert "(default: the library's size for timm:/torchvision: names, 64 for the built-in" in text
    assert "(default: None)" not in text


def test_cli_reports_bad_data_cleanly(capsys):
    assert main(["train", "--data", "/no/such/folder"]) == 1
    assert "neither a demo data set" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["two\nlines", "x" * (artifact.DESCRIPTION_MAX + 1)])
def test_a_bad_description_fails_before_training_starts(text, monkeypatch, capsys):
    def no_backbone(*args):
        raise AssertionError("loaded the backbone before checking the description")

    monkeypatch.setattr(cli, "load_backbone", no_backbone)
    assert main(["train", "--data", "digits", "--description", text]) == 1
    assert "piggy-masks: error: description: must be" in capsys.readouterr().err


def test_training_device_auto_is_cuda_when_present_else_the_cpu(lite0):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    config = train.TrainConfig(device="auto")
    assert train.settings_line(config, lite0, 32).endswith(f"seed 0, {expected}")


def test_folder_images_are_read_upright_as_the_server_reads_them(tmp_path):
    from PIL import Image

    from piggyback_serve.server.preprocess import decode

    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: a viewer rotates it 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    trained = data.as_image(path)
    served = decode(path.read_bytes(), 10**7)
    assert trained.size == served.size == (20, 40)  # rotated upright in both
    mean, std = (0.5,) * 3, (0.5,) * 3
    assert torch.equal(
        data.to_tensor(trained, 32, mean, std), data.to_tensor(served, 32, mean, std)
    )
