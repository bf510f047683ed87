"""Every family a user brings (timm and torchvision, CNNs and vision transformers), from a
local weights file: trained a few steps, run by the engine (both mixed-batch modes), and
answered equal to the reference `W * mask` forward on the unfolded backbone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks import data, inference, train
from piggyback_serve.masks.backbones import NORM_LAYERS, build_classifier, load_backbone
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.worker import Row, Worker
from tests.server.server_support import make_artifact

# name -> the input size the tests use (vision transformers take only their own).
FAMILIES = {
    "timm:resnet10t": 64,
    "timm:efficientnet_b0": 64,
    "timm:mobilenetv3_small_050": 64,
    "timm:regnetx_002": 64,
    "timm:convnext_atto": 64,
    "timm:vit_tiny_patch16_224": 224,
    "timm:deit_tiny_patch16_224": 224,
    "torchvision:regnet_x_400mf": 64,
}
SEED = 3  # the random init written to the weights file (load_backbone's default is 0)


def tiny_data(size: int) -> data.LabelledData:
    """Two classes of noise, dark and bright: 8 training images, 4 held out."""
    rng = np.random.default_rng(0)

    def split(n: int) -> data.Split:
        targets = np.arange(n) % 2
        base = np.where(targets[:, None, None, None] == 1, 170, 40)
        images = (base + rng.integers(0, 60, (n, size, size, 3))).astype(np.uint8)
        return data.Split(list(images), targets)

    return data.LabelledData("tiny", ["dark", "bright"], split(8), split(4))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(backbone from a local weights file, a trained artifact, a random-mask artifact)."""
    name, size = request.param, FAMILIES[request.param]
    state = build_classifier(name, "random", seed=SEED).state_dict()
    if name.startswith("torchvision:"):  # a file saved without the classifier loads too
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("weights") / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = load_backbone(name, str(path))
    assert backbone.fingerprint == load_backbone(name, "random", seed=SEED).fingerprint
    assert backbone.fingerprint != load_backbone(name, "random").fingerprint

    tiny = tiny_data(size)
    # Its own norm layers too: BatchNorm, LayerNorm or GroupNorm, whichever the family has.
    config = train.TrainConfig(
        epochs=1, min_steps=2, batch_size=4, input_size=size, lr_mask=0.05, train_bn=True,
        progress=False,
    )  # fmt: skip
    result = train.train(backbone, tiny, config)
    trained = artifacts.read(
        artifacts.to_bytes(train.to_artifact(result, backbone, tiny, config, "trained"))
    )
    artifacts.validate(trained, backbone)
    assert trained.backbone == name
    assert 0 < trained.metrics["sparsity"] < 1  # its mask switched weights off
    norms = {k.rpartition(".")[0] for k in trained.bn}
    kinds = {type(backbone.module.get_submodule(n)).__name__ for n in norms}
    assert kinds, "no per-task norm layer"
    if "vit" in name or "deit" in name or "convnext" in name:
        assert any("LayerNorm" in k for k in kinds), kinds
    masked = make_artifact(backbone, "masked", n_labels=3, seed=1, input_size=size, keep=0.9)
    normed = with_norms(make_artifact(backbone, "normed", 4, seed=2, input_size=size), backbone)
    return backbone, {"trained": trained, "masked": masked, "normed": normed}


def with_norms(art, backbone):
    """`art` with its own norm layers: every BN/LN/GN tensor of the backbone, perturbed."""
    g = torch.Generator().manual_seed(7)
    state = backbone.module.state_dict()
    for layer, module in backbone.module.named_modules():
        if isinstance(module, NORM_LAYERS):
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                tensor = state.get(f"{layer}.{suffix}")
                if tensor is not None:
                    noise = 1 + 0.3 * torch.rand(tensor.shape, generator=g)
                    art.bn[f"{layer}.{suffix}"] = tensor * noise + 0.05 * (suffix == "bias")
    artifacts.validate(art, backbone)
    return art


def reference(backbone, art, x: torch.Tensor) -> torch.Tensor:
    params = inference.materialise(art, backbone)
    with torch.inference_mode():
        return torch.softmax(inference.forward(backbone, params, x), -1)


@pytest.mark.slow
@pytest.mark.parametrize("one_pass", [False, True], ids=["per-task", "one-pass"])
def test_engine_answers_the_reference_on_every_family(family, one_pass):
    backbone, arts = family
    size = arts["trained"].input_size
    worker = Worker.local(WorkerConfig(0, "cpu", "float32", 1, one_pass=one_pass), backbone)
    states = {name: worker.prepare(art) for name, art in arts.items()}
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1
    order = ["trained", "masked", "normed", "masked", "trained"]
    # The per-task norms matter: without them the answer moves (so the check below sees them).
    plain = dataclasses.replace(arts["normed"], bn={})
    moved = reference(backbone, plain, x[2:3]) - reference(backbone, arts["normed"], x[2:3])
    assert moved.abs().max() > 1e-3
    mixed = worker.step([Row((n, "1"), states[n]) for n in order], x)
    for i, name in enumerate(order):
        want = reference(backbone, arts[name], x[i : i + 1])[0]
        got = mixed[i]
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (name, (got - want).abs().max())
        alone = worker.step([Row((name, "1"), states[name])], x[i : i + 1])[0]
        assert torch.allclose(alone, got, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_piggy_serve_serves_a_vit_trained_by_piggy_masks(tmp_path):
    """The commands a user runs: `piggy-masks train --backbone timm:... --weights FILE`,
    then `piggy-serve` with PIGGY_BACKBONE and PIGGY_BACKBONE_WEIGHTS, over HTTP."""
    import io

    from PIL import Image

    from piggyback_serve.masks.cli import main as masks_cli
    from tests.server.server_support import Reference
    from tests.server.test_e2e import piggy_serve

    name = "timm:vit_small_patch16_224"
    weights = tmp_path / "weights.safetensors"
    state = build_classifier(name, "random", seed=SEED).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    folder = tmp_path / "images"
    tiny = tiny_data(48)
    for i, (image, target) in enumerate(zip(tiny.train.images, tiny.train.targets, strict=True)):
        (folder / tiny.labels[target]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / tiny.labels[target] / f"{i}.png")
    registry = tmp_path / "tasks"
    registry.mkdir()
    out = registry / "shades.safetensors"
    code = masks_cli(
        ["train", "--data", str(folder), "--task", "shades", "--out", str(out)]
        + ["--backbone", name, "--weights", str(weights), "--no-compare"]
        + ["--epochs", "1", "--min-steps", "2", "--batch-size", "4", "--lr-mask", "0.05"]
    )
    assert code == 0
    art = artifacts.read(out)
    assert (art.backbone, art.input_size) == (name, 224)  # the library's size by default
    backbone = load_backbone(name, str(weights))
    assert art.backbone_sha256 == backbone.fingerprint
    reference = Reference(backbone, {"shades": art})

    env = dict(
        PIGGY_BACKBONE=name, PIGGY_BACKBONE_WEIGHTS=str(weights), PIGGY_REGISTRY=f"dir:{registry}"
    )
    with piggy_serve(tmp_path, **env) as client:
        for image in tiny.test.images[:2]:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            body = buf.getvalue()
            r = client.post(
                "/predict?task=shades", content=body, headers={"content-type": "image/png"}
            )
            assert r.status_code == 200, r.text
            reference.check("shades", body, r.json()["results"][0], top_k=2)
        other = dict(env, PIGGY_BACKBONE_WEIGHTS="random")
    # The same task on other weights of the same model is refused, naming the field.
    with piggy_serve(tmp_path, **other) as client:
        r = client.post("/predict?task=shades", content=body, headers={"content-type": "image/png"})
        assert r.status_code == 404, r.text


def test_a_per_task_norm_the_engine_cannot_apply_is_refused_by_name():
    """A LayerNorm with a zero in its weight has no exact ratio: a task with its own values
    there is refused (ArtifactError: a 422 on upload), not served wrong."""
    from piggyback_serve.masks.errors import ArtifactError

    backbone = load_backbone("timm:convnext_atto", "random")
    with torch.no_grad():
        backbone.module.get_submodule("stages.0.blocks.0.norm").weight[0] = 0
    worker = Worker.local(WorkerConfig(0, "cpu", "float32", 1, one_pass=False), backbone)
    art = make_artifact(backbone, "zeroed", seed=1, input_size=64)
    worker.prepare(art)  # without own norms: served
    art.bn["stages.0.blocks.0.norm.weight"] = torch.ones(40)
    with pytest.raises(ArtifactError, match=r"bn\.stages\.0\.blocks\.0\.norm.*not supported"):
        worker.prepare(art)
