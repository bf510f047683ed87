"""BatchNorm folded into the convolution before it: a pure transform on a copy of the module
(as timm's `reparameterize_model` is).

In eval mode a BatchNorm is a per-channel affine, y = s * z + b' with s = gamma / sqrt(var +
eps) and b' = beta - mean * s. Where z is a convolution's output, conv(x, W) * s + b' =
conv(x, W * s) + b': the scale goes into the weights, b' into the bias, and the BN layer
disappears from the forward. Masks commute with a per-output-channel scale, so
(W * s) * M is every task's weights too. What is left of each BN is a `ChannelAffine`:
nothing (folded), or the affine itself where no conv feeds it or a channel's scale is 0.

A task with its own BN makes its rows y_t = s_t * z + b_t'. After a folded conv that is
(s_t / s) * y + (b_t' - (s_t / s) * b'), an exact per-channel affine on the folded output;
after an unfolded one it is (s_t, b_t') in place of the backbone's (`NormSite.task_affine`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("piggy.serve")

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")
# Folding is checked on a random input: the folded module must answer within this of the
# original (relative to the features' scale), else no BN is folded.
CHECK_TOLERANCE = 1e-4


class ChannelAffine(nn.Module):
    """What is left of a BatchNorm: y = x * scale + shift per channel (dim 1), or nothing
    where it was folded into the conv before it (scale None).

    `task` overrides it for the task the working copy runs: (scale, shift) of shape [C],
    or [rows, C] for a batch whose rows differ (the one-pass mixed batch). The channels are
    dim 1 (NCHW maps) or the last dim (`channel_dim_last=True`: a LayerNorm's tokens)."""

    def __init__(
        self,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        channel_dim_last: bool = False,
    ):
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        self.channel_dim_last = channel_dim_last
        self.task: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.task if self.task is not None else (self.scale, self.shift)
        if scale is None:
            return x
        rows = scale.shape[0] if scale.dim() == 2 else 1
        if self.channel_dim_last:
            shape = (rows, *([1] * (x.dim() - 2)), x.shape[-1])
        else:
            shape = (rows, x.shape[1], *([1] * (x.dim() - 2)))
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


@dataclass(frozen=True)
class NormSite:
    """One BatchNorm of the backbone, as the working copy holds it after folding."""

    name: str  # the BN's module name in the backbone (artifacts' bn.<name>.<suffix>)
    module: str  # the ChannelAffine's module name in the folded module
    folded: bool
    eps: float
    weight: torch.Tensor  # the backbone's gamma, beta, mean, var (float32, CPU)
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    # "batch": a BatchNorm; "affine": a LayerNorm or GroupNorm, whose own affine (weight,
    # bias) stays in it, a task's own applied after it as a ratio (as for a folded BN).
    kind: str = "batch"

    @property
    def channels(self) -> int:
        return self.running_mean.numel()

    def affine(self, own: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """(s, b') of the BN with the backbone's tensors, or a task's where it has its own;
        a LayerNorm's or GroupNorm's (weight, bias)."""
        own = own or {}
        if self.kind == "affine":
            return own.get("weight", self.weight).float(), own.get("bias", self.bias).float()
        w, b, mean, var = (own.get(k, getattr(self, k)).float() for k in BN_SUFFIXES)
        scale = w / torch.sqrt(var + self.eps)
        return scale, b - mean * scale

    def task_affine(self, own: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, shift) a task with its own BN tensors `own` applies here."""
        task_scale, task_shift = self.affine(own)
        if not self.folded:
            return task_scale, task_shift
        scale, shift = self.affine()
        ratio = task_scale / scale
        return ratio, task_shift - ratio * shift

    def identity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, shift) a task without its own BN applies here."""
        if self.folded:
            return torch.ones(self.channels), torch.zeros(self.channels)
        return self.affine()


def fold_batchnorm(module: nn.Module, input_size: int) -> tuple[nn.Module, list[NormSite]]:
    """A copy of `module` (eval mode) with every BatchNorm folded or made a ChannelAffine."""
    folded, sites = _fold(module, _conv_before_bn(copy.deepcopy(module).eval(), input_size))
    if not _answers_alike(module, folded, input_size):
        log.warning("folding BatchNorm changed the features: BN layers kept as affines")
        folded, sites = _fold(module, {})
    return folded, sites


def _fold(module: nn.Module, pairs: dict[str, str]) -> tuple[nn.Module, list[NormSite]]:
    folded = copy.deepcopy(module).eval()
    layers = dict(folded.named_modules())
    sites = []
    for name, bn in list(layers.items()):
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        site = _site(name, bn, folded=False)
        scale, shift = site.affine()
        conv = layers.get(pairs.get(name, ""))
        fold = conv is not None and bool((scale != 0).all())
        if fold:
            _scale_conv(conv, scale, shift)
            affine = ChannelAffine()
        else:
            affine = ChannelAffine(scale, shift)
        replacement, inner = _replacement(bn, affine)
        _set_module(folded, name, replacement)
        sites.append(_site(name, bn, folded=fold, module=inner))
    for name, norm in list(layers.items()):
        if _affine_norm(norm):
            # Followed by an identity affine, which a task with its own weight and bias
            # sets to (w_t / w, b_t - (w_t / w) * b): exact where w has no zero.
            # nn.LayerNorm normalises the last dim; timm's LayerNorm2d, like GroupNorm, dim 1.
            last = isinstance(norm, nn.LayerNorm) and type(norm).__name__ != "LayerNorm2d"
            _set_module(folded, name, nn.Sequential(norm, ChannelAffine(None, None, last)))
            sites.append(_affine_site(name, norm))
    return folded, sites


def _affine_norm(layer: nn.Module) -> bool:
    """A LayerNorm over one dim, or a GroupNorm, with an affine a task can change: not one
    with an activation inside (timm's *NormAct: the affine would land after it)."""
    if isinstance(layer, nn.LayerNorm):
        ok = len(layer.normalized_shape) == 1
    elif isinstance(layer, nn.GroupNorm):
        ok = True
    else:
        return False
    weight = getattr(layer, "weight", None)
    return (
        ok
        and weight is not None
        and getattr(layer, "bias", None) is not None
        and not isinstance(getattr(layer, "act", None), nn.Module)
        and bool((weight != 0).all())
    )


def _affine_site(name: str, norm: nn.Module) -> NormSite:
    weight, bias = (getattr(norm, a).detach().float().cpu().clone() for a in ("weight", "bias"))
    zeros = torch.zeros_like(weight)
    return NormSite(name, f"{name}.1", True, 0.0, weight, bias, zeros, zeros + 1, kind="affine")


def _site(name: str, bn: nn.Module, folded: bool, module: str = "") -> NormSite:
    def tensor(attr):
        value = getattr(bn, attr)
        channels = bn.running_mean.numel()
        if value is None:  # affine=False: gamma 1, beta 0
            return torch.ones(channels) if attr == "weight" else torch.zeros(channels)
        return value.detach().float().cpu().clone()

    return NormSite(name, f"{name}{module}", folded, bn.eps, *(tensor(a) for a in BN_SUFFIXES))


def _replacement(bn: nn.Module, affine: ChannelAffine) -> tuple[nn.Module, str]:
    """The module standing in for `bn`, and the ChannelAffine's name within it (timm's
    BatchNormAct2d also carries its dropout and activation)."""
    if isinstance(getattr(bn, "act", None), nn.Module):
        return nn.Sequential(affine, bn.drop, bn.act), ".0"
    return affine, ""


def _scale_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    weight = conv.weight.detach()
    scale = scale.to(weight.dtype)
    conv.weight = nn.Parameter(weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    bias = shift.to(weight.dtype)
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    conv.bias = nn.Parameter(bias, requires_grad=False)


def _set_module(root: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, value)


def _conv_before_bn(module: nn.Module, input_size: int) -> dict[str, str]:
    """BN name -> the conv whose output it takes directly (unchanged in between), found by
    one traced forward."""
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}
    pairs: dict[str, str] = {}

    def conv_hook(name):
        def hook(layer, inputs, out):
            outputs[id(out)] = (name, out, out._version)

        return hook

    def bn_hook(name):
        def hook(layer, inputs, out):
            found = outputs.get(id(inputs[0]))
            if found is not None and found[1] is inputs[0] and found[2] == inputs[0]._version:
                pairs[name] = found[0]

        return hook

    handles = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d):
            handles.append(layer.register_forward_hook(conv_hook(name)))
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            handles.append(layer.register_forward_pre_hook(_pre(bn_hook(name))))
    try:
        with torch.no_grad():
            module(_sample(module, input_size))
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _pre(hook):
    return lambda layer, inputs: hook(layer, inputs, None)


def _sample(module: nn.Module, input_size: int) -> torch.Tensor:
    first = next(module.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, input_size, input_size, generator=generator)
    return x.to(first.device, first.dtype)


def _answers_alike(original: nn.Module, folded: nn.Module, input_size: int) -> bool:
    """Whether the folded module answers what the original does (it does not where a conv's
    output had another use than its BN, which folding changes)."""
    x = _sample(original, input_size)
    with torch.no_grad():
        want, got = original(x), folded(x)
    error = (got - want).abs().max() / want.abs().max().clamp_min(1e-6)
    return bool(error <= CHECK_TOLERANCE)
