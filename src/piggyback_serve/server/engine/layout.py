"""What every worker shares: the folded backbone, its masked weights in one flat buffer, and
a picklable description of where each weight and BatchNorm lives in it.

The pool builds one `Template` from the loaded backbone; each worker builds its working
copy (server/engine/working_copy.py) from it. The pristine flat buffer never changes after
load, so on the CPU the workers share it read-only (shared memory between processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.server.engine.fold import NormSite, fold_batchnorm


@dataclass(frozen=True)
class Slot:
    """One masked weight: its place in the flat buffer and its memory strides."""

    name: str  # the parameter's name, e.g. "blocks.0.conv.weight"
    offset: int  # first element in the flat buffer
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # of the view into the flat buffer (channels_last for convs)

    @property
    def module(self) -> str:
        """The name of the layer that owns the weight."""
        return self.name.rpartition(".")[0]

    @cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @cached_property
    def row_major(self) -> bool:
        """Whether the view's memory order is row-major (dims of size 1 aside): true of
        linears, 1x1 and depthwise convs even in channels_last."""
        step, expected = 1, []
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        pairs = zip(self.strides, reversed(expected), self.shape, strict=True)
        return all(stride == want for stride, want, size in pairs if size > 1)

    def storage_positions(self, logical: torch.Tensor) -> torch.Tensor:
        """Row-major positions in the weight (as artifacts count) -> flat-buffer positions."""
        if self.row_major:
            return logical + self.offset
        coords = unravel(logical, self.shape)
        strides = torch.tensor(self.strides, dtype=torch.int64)
        return self.offset + (coords * strides).sum(dim=1)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.as_strided(self.shape, self.strides, self.offset)


def unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[n] row-major positions -> [n, len(shape)] coordinates."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], dim=1)


@dataclass(frozen=True)
class Layout:
    """Where the masked weights live in the flat buffer, and the backbone's BatchNorms."""

    slots: tuple[Slot, ...]
    norms: tuple[NormSite, ...]

    @cached_property
    def numel(self) -> int:
        return sum(slot.numel for slot in self.slots)

    @cached_property
    def norm_index(self) -> dict[str, int]:
        """BN name in the backbone -> its index in `norms`."""
        return {site.name: i for i, site in enumerate(self.norms)}


@dataclass
class Template:
    """The folded backbone every worker copies: its masked weights are views of `base`."""

    module: nn.Module  # folded, eval, channels_last
    base: torch.Tensor  # the pristine masked weights, flat
    layout: Layout

    @classmethod
    def of(cls, backbone: Backbone) -> Template:
        module, norms = fold_batchnorm(backbone.module, backbone.input_size)
        # channels_last: oneDNN's CPU convolutions run 1.25-1.5x faster in it (measured:
        # EfficientNet-Lite0 b8 224 px, resnet18 b16 64 px); the flat buffer keeps it.
        module.to(memory_format=torch.channels_last)
        base, slots = _flatten(module)
        return cls(module, base, Layout(tuple(slots), tuple(norms)))

    def share_memory(self) -> Template:
        """Move every tensor to shared memory, so that worker processes map it, not copy it."""
        self.module.share_memory()
        self.base.share_memory_()
        return self


def _flatten(module: nn.Module) -> tuple[torch.Tensor, list[Slot]]:
    """Every Conv2d/Linear weight rebound as a view of one new flat buffer, in module order."""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    first = layers[0][1].weight
    flat = torch.empty(sum(m.weight.numel() for _, m in layers), dtype=first.dtype)
    slots, offset = [], 0
    for name, layer in layers:
        weight = layer.weight.detach()
        key = f"{name}.weight" if name else "weight"
        slot = Slot(key, offset, tuple(weight.shape), tuple(weight.stride()))
        view = slot.view(flat)
        view.copy_(weight)
        layer.weight = nn.Parameter(view, requires_grad=False)
        slots.append(slot)
        offset += weight.numel()
    return flat, slots
