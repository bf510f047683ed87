"""The Piggyback method: real-valued mask scores, a thresholded binary mask, the STE.

Forward uses W * (score > threshold); backward passes the gradient w.r.t. the binary
mask to the score unchanged (straight-through), as in the paper's `Binarizer`.
The backbone is never modified: the masked weights are handed to it per call with
`torch.func.functional_call`, the same mechanism the server uses to serve a task.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from piggyback_serve.masks.backbones import NORM_LAYERS, Backbone

DEFAULT_THRESHOLD = 5e-3
DEFAULT_SCORE_INIT = 1e-2


class Binarize(torch.autograd.Function):
    """1 where score > threshold else 0; the gradient goes through unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_mask, None


def binarize(scores: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    return Binarize.apply(scores, threshold)


def _key(param_name: str) -> str:
    # ParameterDict keys may not contain dots.
    return param_name.replace(".", "__")


class PiggybackModel(nn.Module):
    """A frozen backbone, one score tensor per maskable weight, and a new linear head.

    train_bn=True gives the task its own norm layers (the paper's optional per-task BN):
    BatchNorm's affine parameters and statistics, LayerNorm's and GroupNorm's affine;
    otherwise they stay frozen (BN in eval mode).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        threshold: float = DEFAULT_THRESHOLD,
        score_init: float = DEFAULT_SCORE_INIT,
        train_bn: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.threshold = threshold
        self.train_bn = train_bn
        self.weights = backbone.maskable()
        self.scores = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full_like(w, score_init)) for n, w in self.weights.items()}
        )
        self.bn = nn.ParameterDict()
        self.bn_buffers: dict[str, torch.Tensor] = {}
        if train_bn:
            self._copy_batchnorm()
        self.head = nn.Linear(backbone.num_features, num_classes)

    # The backbone is held outside the module tree on purpose: it is shared, frozen and
    # must not show up in this task's parameters or state_dict.
    @property
    def backbone_module(self) -> nn.Module:
        return self.backbone.module

    def _copy_batchnorm(self) -> None:
        for prefix, layer in self.backbone_module.named_modules():
            if not isinstance(layer, NORM_LAYERS):
                continue
            for attr in ("weight", "bias"):
                if getattr(layer, attr, None) is not None:
                    self.bn[_key(f"{prefix}.{attr}")] = nn.Parameter(getattr(layer, attr).clone())
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                for attr in ("running_mean", "running_var"):
                    self.bn_buffers[f"{prefix}.{attr}"] = getattr(layer, attr).clone()

    def masks(self) -> dict[str, torch.Tensor]:
        """The binary mask of every maskable weight, as bool tensors."""
        return {n: self.scores[_key(n)].detach() > self.threshold for n in self.weights}

    def bn_state(self) -> dict[str, torch.Tensor]:
        """Per-task BN tensors keyed by backbone name (empty when BN is frozen)."""
        state = {k.replace("__", "."): p.detach() for k, p in self.bn.items()}
        state.update(self.bn_buffers)
        return state

    def task_params(self) -> dict[str, torch.Tensor]:
        """The tensors that replace the backbone's own for this task (masked weights, BN)."""
        params = {
            n: w * binarize(self.scores[_key(n)], self.threshold) for n, w in self.weights.items()
        }
        params.update({k.replace("__", "."): p for k, p in self.bn.items()})
        params.update(self.bn_buffers)
        return params

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.backbone_module, self.task_params(), (x,), strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> PiggybackModel:
        super().train(mode)
        self.backbone_module.eval()
        if mode and self.train_bn:
            for layer in self.backbone_module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.train()
        return self

    def sparsity(self) -> float:
        """Fraction of maskable weights switched off."""
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        return sum((~m).sum().item() for m in masks.values()) / total
