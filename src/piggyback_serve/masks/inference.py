"""Running a task from its artifact: materialise W * mask once, then plain forwards."""

from __future__ import annotations

import torch
from torch.func import functional_call

from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.backbones import Backbone


def materialise(
    artifact: TaskArtifact,
    backbone: Backbone,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors that replace the backbone's for this task: W * mask, per-task BN, head.

    Keys are backbone state names, plus "head.weight" and "head.bias".
    """
    weights = backbone.maskable()
    device = device or next(iter(weights.values())).device
    params: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        weight = weight.detach().to(device)
        mask = artifact.mask(name, weight.shape, device)
        params[name] = (weight * mask).to(dtype or weight.dtype)
    for name, tensor in artifact.bn.items():
        params[name] = tensor.to(device, dtype or tensor.dtype)
    params["head.weight"] = artifact.head_weight.to(device, dtype or torch.float32)
    params["head.bias"] = artifact.head_bias.to(device, dtype or torch.float32)
    return params


TASK_HEAD = ("head.weight", "head.bias")


def forward(backbone: Backbone, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the task whose materialised `params` are given; the backbone is untouched."""
    # Exactly these two keys: a backbone may have modules named "head" of its own (timm's
    # ConvNeXt keeps its head's norm, head.norm, in the backbone).
    backbone_params = {k: v for k, v in params.items() if k not in TASK_HEAD}
    features = functional_call(backbone.module, backbone_params, (x,), strict=False)
    return torch.nn.functional.linear(features, params["head.weight"], params["head.bias"])


def params_nbytes(params: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())
