import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from masks.backbones import build_classifier, fingerprint, load_backbone
from masks.data import to_tensor
from masks.errors import BackboneError


def test_efficientnet_lite0_has_the_documented_maskable_weights(lite0):
    weights = lite0.maskable()
    assert len(weights) == 49
    assert sum(w.numel() for w in weights.values()) == 3_328_992
    assert lite0.num_features == 1280 and not any(
        p.requires_grad for p in lite0.module.parameters()
    )


@pytest.mark.slow
def test_pretrained_lite0_sees_the_cat():
    from skimage import data

    model = build_classifier("efficientnet_lite0")
    x = to_tensor(Image.fromarray(data.chelsea()), 224, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    # ImageNet 281..285 are the domestic cats; chelsea is a tabby.
    assert 281 <= probs.argmax().item() <= 285 and probs[281:286].sum() > 0.5


def test_fingerprint_is_deterministic_and_sensitive():
    a, b = load_backbone("resnet18", "random"), load_backbone("resnet18", "random")
    assert a.fingerprint == b.fingerprint
    assert load_backbone("resnet18", "random", seed=1).fingerprint != a.fingerprint
    with torch.no_grad():
        next(iter(b.module.parameters())).view(-1)[0] += 1e-3
    assert fingerprint(b.module) != a.fingerprint


def test_local_weights_file_is_used(tmp_path):
    model = build_classifier("resnet18", "random", seed=3)
    path = tmp_path / "r18.safetensors"
    save_file(model.state_dict(), path)
    loaded = load_backbone("resnet18", str(path))
    assert loaded.fingerprint == load_backbone("resnet18", "random", seed=3).fingerprint


def test_missing_torchvision_weights_name_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BackboneError) as err:
        load_backbone("resnet50")
    message = str(err.value)
    assert "cache" in message and "weights file" in message and "random" in message


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        load_backbone("vgg11")


@pytest.mark.parametrize("name", ["resnet34", "mobilenet_v3_large"])
def test_other_torchvision_backbones_build(name):
    backbone = load_backbone(name, "random")
    out = backbone.module(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, backbone.num_features)


def test_preprocessing_is_resize_centre_crop_normalise():
    img = Image.fromarray(np.full((40, 80, 3), 255, dtype=np.uint8))
    x = to_tensor(img, 32, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))
