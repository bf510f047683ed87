"""What each masked layer sees at one input size: its input (padded as the layer pads it),
its output, and how a weight position maps to an input element. The mixed-batch
correction (server/engine/mixed.py) needs this to gather, for a switched-off weight, the input
values it multiplies.

Traced once per input size on a copy of the module on the meta device (taken when the
engine starts): shapes only, and the engine's own module is never touched from another
thread.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from piggyback_serve.server.engine.layout import Slot


@dataclass(frozen=True)
class LayerGeometry:
    """One masked layer at one input size. Linear layers are 1x1 convs on a 1x1 input."""

    linear: bool
    pad: tuple[int, int, int, int] | None  # F.pad's (left, right, top, bottom), None: none
    channels: int  # input channels C
    padded_hw: tuple[int, int]  # Hp, Wp
    out_hw: tuple[int, int]  # Ho, Wo
    stride: tuple[int, int]
    dilation: tuple[int, int]
    out_per_group: int
    in_per_group: int
    kernel: tuple[int, int]
    # Whether the one-pass correction can gather this layer's inputs: not for a Linear on
    # token inputs ([rows, tokens, features], as in vision transformers) nor a conv with
    # padding other than zeros. Such a layer runs per task block instead (server/engine/mixed.py).
    gatherable: bool = True

    @property
    def row_stride(self) -> int:
        """Elements per image of the (padded, channels_last) input."""
        return self.padded_hw[0] * self.padded_hw[1] * self.channels

    def gather_offsets(self, logical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For row-major weight positions: (input offset within an image of the padded NHWC
        input at output pixel (0, 0), output channel)."""
        kh_kw = self.kernel[0] * self.kernel[1]
        per_out = self.in_per_group * kh_kw
        out = logical // per_out
        rest = logical % per_out
        i, k = rest // kh_kw, rest % kh_kw
        kh, kw = k // self.kernel[1], k % self.kernel[1]
        channel = (out // self.out_per_group) * self.in_per_group + i
        wp, c = self.padded_hw[1], self.channels
        offset = channel + kh * self.dilation[0] * wp * c + kw * self.dilation[1] * c
        return offset, out


def conv_padding(layer: nn.Conv2d, x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The zero padding `layer` applies to input `x` (timm's Conv2dSame pads per input)."""
    if type(layer).__name__ == "Conv2dSame":
        from timm.layers.padding import get_same_padding

        ih, iw = x.shape[-2:]
        ph = get_same_padding(ih, layer.kernel_size[0], layer.stride[0], layer.dilation[0])
        pw = get_same_padding(iw, layer.kernel_size[1], layer.stride[1], layer.dilation[1])
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    else:
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError(f"unsupported padding {layer.padding!r}/{layer.padding_mode}")
        ph, pw = layer.padding
        pads = (pw, pw, ph, ph)
    return pads if any(pads) else None


def padded(layer: nn.Module, x: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """`x` as the layer's weights see it: zero padded, channels_last (NHWC in memory)."""
    if geometry.linear:
        return x.contiguous()
    if geometry.pad is not None:
        x = F.pad(x, geometry.pad)
    return x.contiguous(memory_format=torch.channels_last)


class Geometries:
    """LayerGeometry per slot, per input size; computed on first use, then cached."""

    def __init__(self, module: nn.Module, slots: list[Slot]):
        # A shapes-only copy, taken now: later the engine's module may carry a mixed
        # batch's hooks, which must not run in a trace from another thread.
        self._meta = copy.deepcopy(module).to("meta")
        self._names = [s.module for s in slots]
        self._cache: dict[int, list[LayerGeometry]] = {}
        self._lock = threading.Lock()

    def at(self, input_size: int) -> list[LayerGeometry]:
        with self._lock:
            if input_size not in self._cache:
                self._cache[input_size] = self._trace(input_size)
            return self._cache[input_size]

    def _trace(self, input_size: int) -> list[LayerGeometry]:
        meta = self._meta
        layers = dict(meta.named_modules())
        found: dict[str, LayerGeometry] = {}

        def record(name):
            def hook(layer, inputs, output):
                found[name] = _geometry(layer, inputs[0], output)

            return hook

        handles = [layers[n].register_forward_hook(record(n)) for n in self._names]
        with torch.no_grad():
            meta(torch.empty(1, 3, input_size, input_size, device="meta"))
        for handle in handles:
            handle.remove()
        missing = [n for n in self._names if n not in found]
        if missing:
            raise ValueError(f"masked layers not reached by a forward: {missing[:3]}")
        return [found[n] for n in self._names]


def _geometry(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> LayerGeometry:
    if isinstance(layer, nn.Linear):
        features = x.shape[-1]
        return LayerGeometry(
            True,
            None,
            features,
            (1, 1),
            (1, 1),
            (1, 1),
            (1, 1),
            out.shape[-1],
            features,
            (1, 1),
            gatherable=x.dim() == 2,
        )
    try:
        pads = conv_padding(layer, x)
        gatherable = True
    except ValueError:  # "same"/"valid" strings, reflect or circular padding
        pads, gatherable = None, False
    h, w = x.shape[-2:]
    if pads is not None:
        h, w = h + pads[2] + pads[3], w + pads[0] + pads[1]
    return LayerGeometry(
        linear=False,
        pad=pads,
        channels=x.shape[1],
        padded_hw=(h, w),
        out_hw=tuple(out.shape[-2:]),
        stride=tuple(layer.stride),
        dilation=tuple(layer.dilation),
        out_per_group=layer.out_channels // layer.groups,
        in_per_group=layer.in_channels // layer.groups,
        kernel=tuple(layer.kernel_size),
        gatherable=gatherable,
    )
