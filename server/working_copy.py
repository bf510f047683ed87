"""The engine's one working copy of the masked weights, and where each weight lives in it.

Every Conv2d/Linear weight that tasks mask becomes a view into ONE flat buffer (in the
layout the module runs in, channels_last for convs), and a pristine copy of that buffer is
kept beside it. Switching the copy from one task to another is then two indexed writes
over the whole model: put back the weights the old task switched off, zero the ones the
new task switches off. The forward is the plain module, no tensors swapped per call.
BatchNorm tensors get the same treatment (one flat buffer, views, a pristine copy), so a
task with its own BN switches in with two more indexed writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from masks.backbones import Backbone
from masks.codec import unpack_bits

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Slot:
    """One masked weight: its module, its place in the flat buffer and its memory strides."""

    name: str
    module: nn.Module
    offset: int  # first element in the flat buffer
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # of the view into the flat buffer (channels_last for convs)

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


def unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[n] row-major positions -> [n, len(shape)] coordinates."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], dim=1)


def _view_of(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of flat[offset:] with the shape and (dense, any order) strides of `like`."""
    return flat.as_strided(like.shape, like.stride(), offset)


class WorkingCopy:
    """The masked weights and BN tensors of `backbone.module`, rebound as views of flat buffers.

    `patched` is the key of the task whose switched-off weights are zeroed now (None: none).
    Built once per engine, on the device; only the engine thread calls `switch`.
    """

    def __init__(self, backbone: Backbone):
        module = backbone.module
        self.slots, self.flat = self._rebind_masked(module, backbone.maskable())
        self.base = self.flat.clone()
        self.bn_offsets, self.bn_flat = self._rebind_batchnorm(module)
        self.bn_base = self.bn_flat.clone()
        self.patched = None
        self._dense = False  # the patched task came as a bitmap: restore densely
        self._zeroed = torch.empty(0, dtype=torch.int32, device=self.flat.device)
        self._bn_written = torch.empty(0, dtype=torch.int32, device=self.flat.device)

    @staticmethod
    def _rebind_masked(
        module: nn.Module, weights: dict[str, nn.Parameter]
    ) -> tuple[list[Slot], torch.Tensor]:
        total = sum(w.numel() for w in weights.values())
        first = next(iter(weights.values()))
        flat = torch.empty(total, dtype=first.dtype, device=first.device)
        layers = dict(module.named_modules())
        slots, offset = [], 0
        for name, weight in weights.items():
            view = _view_of(flat, offset, weight)
            view.copy_(weight.detach())
            owner = layers[name.rpartition(".")[0]]
            owner.weight = nn.Parameter(view, requires_grad=False)
            slots.append(Slot(name, owner, offset, tuple(view.shape), tuple(view.stride())))
            offset += weight.numel()
        return slots, flat

    def _rebind_batchnorm(self, module: nn.Module) -> tuple[dict[str, int], torch.Tensor]:
        found = {}
        self._bn_layers = []
        for prefix, layer in module.named_modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                self._bn_layers.append((prefix, layer))
                for attr in BN_TENSORS:
                    tensor = getattr(layer, attr, None)
                    if tensor is not None:
                        found[f"{prefix}.{attr}"] = (layer, attr, tensor)
        device = next(module.parameters()).device
        dtype = next(module.parameters()).dtype
        flat = torch.empty(sum(t.numel() for *_, t in found.values()), dtype=dtype, device=device)
        offsets, offset = {}, 0
        for name, (layer, attr, tensor) in found.items():
            view = flat[offset : offset + tensor.numel()]
            view.copy_(tensor.detach())
            if attr in ("weight", "bias"):
                setattr(layer, attr, nn.Parameter(view, requires_grad=False))
            else:
                setattr(layer, attr, view)  # a registered buffer: plain assignment rebinds it
            offsets[name] = offset
            offset += tensor.numel()
        self.bn_sizes = {name: t.numel() for name, (_, _, t) in found.items()}
        return offsets, flat

    def bn_layers(self) -> list[tuple[str, nn.Module]]:
        return self._bn_layers

    def bn_vector(self, positions: torch.Tensor | None, values) -> torch.Tensor:
        """The whole BN buffer as a task sees it: pristine, with its own values written."""
        if positions is None or not positions.numel():
            return self.bn_base
        vector = self.bn_base.clone()
        vector.index_put_((positions,), values)
        return vector

    def bn_slices(self, prefix: str, vector: torch.Tensor) -> list[torch.Tensor | None]:
        """weight, bias, running_mean, running_var of BN layer `prefix` within `vector`."""
        out = []
        for attr in BN_TENSORS:
            offset = self.bn_offsets.get(f"{prefix}.{attr}")
            size = self.bn_sizes.get(f"{prefix}.{attr}", 0)
            out.append(None if offset is None else vector[offset : offset + size])
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the working copy and its pristine twin (masked weights and BN)."""
        return 2 * (self.flat.nbytes + self.bn_flat.nbytes)

    def switch(
        self, key, zeroed: torch.Tensor, bn_positions: torch.Tensor, bn_values, off_bits=None
    ) -> None:
        """Make the copy run task `key`: switched-off flat positions `zeroed` (int32, on the
        device) or, for a task that switches off many, `off_bits` (the flat mask packed,
        1 = off), and its own BN values at `bn_positions` (empty for a task without BN)."""
        if key == self.patched:
            return
        # index_copy_/index_fill_ on int64 positions: ~3x faster than index_put_ here.
        if self._dense:
            self.flat.copy_(self.base)
        elif self._zeroed.numel():
            restore = self._zeroed.long()
            self.flat.index_copy_(0, restore, self.base.index_select(0, restore))
        if off_bits is not None:
            self.flat.masked_fill_(unpack_bits(off_bits, self.flat.shape), 0)
        elif zeroed.numel():
            self.flat.index_fill_(0, zeroed.long(), 0)
        self._dense = off_bits is not None
        if self._bn_written.numel():
            written = self._bn_written.long()
            self.bn_flat.index_copy_(0, written, self.bn_base.index_select(0, written))
        if bn_positions.numel():
            self.bn_flat.index_copy_(0, bn_positions.long(), bn_values)
        self._zeroed, self._bn_written, self.patched = zeroed, bn_positions, key

    def reset(self) -> None:
        """Back to the pristine backbone (no task)."""
        empty = self._zeroed[:0]
        self.switch(None, empty, empty, None)
