import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from piggyback_serve.masks.backbones import build_classifier, fingerprint, load_backbone
from piggyback_serve.masks.data import to_tensor
from piggyback_serve.masks.errors import BackboneError


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


# -- backbones by library and name ---------------------------------------------------------


def test_library_names_take_the_librarys_config_and_head():
    vit = load_backbone("timm:vit_tiny_patch16_224", "random")
    assert (vit.name, vit.input_size, vit.mean, vit.train_size) == (
        "timm:vit_tiny_patch16_224", 224, (0.5, 0.5, 0.5), 224
    )  # fmt: skip
    # Masked: the patch embedding, attention's qkv and projection, the MLP; not the head.
    keys = vit.maskable()
    assert "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys
    assert "blocks.11.mlp.fc2.weight" in keys and not any(k.startswith("head") for k in keys)
    tv = load_backbone("torchvision:mobilenet_v3_small", "random")
    assert (tv.num_features, tv.input_size, tv.train_size) == (1024, 224, 224)
    assert "classifier.0.weight" in tv.maskable() and "classifier.3.weight" not in tv.maskable()
    assert load_backbone("resnet18", "random").train_size == 64  # the aliases keep 64


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("timm:no_such_model", "timm has no model 'no_such_model'"),
        ("torchvision:vit_b_17", "did you mean"),
        ("keras:resnet50", "timm:<model> or torchvision:<model>"),
        ("torchvision:vit_b_16", "self_attention is a MultiheadAttention"),
        ("torchvision:squeezenet1_0", "no classifier head found"),
    ],
)
def test_unsupported_or_unknown_models_are_refused_by_name(name, says):
    with pytest.raises(BackboneError, match=says):
        load_backbone(name, "random")


def test_weight_tied_models_are_refused():
    from piggyback_serve.masks.backbones import check_supported

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(BackboneError, match="1.weight and 0.weight are one tied tensor"):
        check_supported(model, "tied")


def test_a_weights_file_with_or_without_the_head_but_nothing_else_missing(tmp_path):
    name = "timm:regnetx_002"
    state = build_classifier(name, "random", seed=2).state_dict()
    want = load_backbone(name, "random", seed=2).fingerprint
    for kept, label in (
        (state, "with"),
        ({k: v for k, v in state.items() if "head" not in k}, "without"),
    ):  # noqa: E501
        path = tmp_path / f"{label}.safetensors"
        save_file(kept, path)
        assert load_backbone(name, str(path)).fingerprint == want, label
    broken = {k: v for k, v in state.items() if not k.startswith("stem.")}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(BackboneError, match="does not fit the model: missing"):
        load_backbone(name, str(tmp_path / "broken.safetensors"))


def test_timm_without_cached_weights_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BackboneError, match="Hugging Face cache.*--weights random"):
        load_backbone("timm:regnetx_002")


def test_timm_weights_come_from_the_hugging_face_cache_where_they_are(tmp_path, monkeypatch):
    """The layout huggingface_hub downloads into: refs/main names the snapshot."""
    import huggingface_hub.constants as hub

    name = "timm:regnetx_002"
    repo = tmp_path / "hub" / "models--timm--regnetx_002.pycls_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(
        build_classifier(name, "random", seed=4).state_dict(),
        repo / "snapshots" / "abc123" / "model.safetensors",
    )
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_backbone(name).fingerprint == load_backbone(name, "random", seed=4).fingerprint


def test_torchvision_weights_come_from_torch_hubs_cache_where_they_are(tmp_path, monkeypatch):
    import torchvision

    name = "torchvision:mobilenet_v3_small"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(build_classifier(name, "random", seed=4).state_dict(), cached)
    assert load_backbone(name).fingerprint == load_backbone(name, "random", seed=4).fingerprint
