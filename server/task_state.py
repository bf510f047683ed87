"""A task as the engine holds it: a sparse patch of the working copy, its head and its BN.

Built once when the task is registered (off the engine thread), from the artifact:
- `zeroed`: the flat working-copy positions of the weights it switches off (int32,
  layer by layer in slot order), with `counts` per layer;
- `gather`/`out_channel`: for each of those weights, where its input lives in an image of
  the layer's padded input and which output channel it feeds: what the one-pass mixed
  batch's correction needs (server/mixed.py); built only for an engine that runs mixed
  batches in one pass (empty otherwise: 4 bytes per switched-off weight instead of 10);
- `off_bits`: instead of `zeroed`, for a task that switches off over DENSE_FRACTION of
  the weights (per-task engines only): the flat mask bit-packed, 1 = switched off. There
  a bitmap is over 6x smaller than positions (1 bit a weight against 4 bytes a position);
  the switch costs more on the CPU (a dense restore and fill: 24 ms against 7.5 ms of
  scattered writes at 20% off on EfficientNet-Lite0, one thread), so below that fraction
  positions win on both counts;
- the head, and its own BN values at their positions in the BN buffer (if any).
Nothing dense per task: memory grows with the weights a task switches off, up to a bit
per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from masks.artifact import TaskArtifact
from masks.codec import pack_bits
from server.geometry import Geometries
from server.working_copy import WorkingCopy

INT32_MAX = 2**31 - 1
# Past this fraction of the masked weights switched off, a task is kept as a bitmap.
DENSE_FRACTION = 1 / 5


@dataclass(frozen=True)
class TaskState:
    zeroed: torch.Tensor  # int32 [n]
    counts: torch.Tensor  # int64 [layers]
    gather: torch.Tensor  # int32 [n]
    out_channel: torch.Tensor  # int16 [n] (int32 past 32k channels)
    head_weight: torch.Tensor  # float32 [labels, features]
    head_bias: torch.Tensor  # float32 [labels]
    bn_positions: torch.Tensor  # int32 [m], empty without per-task BN
    bn_values: torch.Tensor  # [m]
    input_size: int
    off_bits: torch.Tensor | None = None  # uint8, the flat mask packed (1 = off); see above

    @property
    def has_bn(self) -> bool:
        return self.bn_positions.numel() > 0

    @property
    def has_corrections(self) -> bool:
        """Whether the one-pass correction tables were built (see `build`)."""
        return self.off_bits is None and self.gather.numel() == self.zeroed.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors().values())

    def to(self, device: torch.device, dtype: torch.dtype) -> TaskState:
        """On the engine's device; BN values in the engine's dtype, the head stays float32."""
        moved = {k: t.to(device, non_blocking=True) for k, t in self._tensors().items()}
        moved["bn_values"] = moved["bn_values"].to(dtype)
        return replace(self, **moved)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


def build(artifact: TaskArtifact, working: WorkingCopy, geometries: Geometries | None) -> TaskState:
    """The task state of a validated artifact (CPU tensors); with `geometries`, the
    one-pass correction tables too."""
    layers = geometries.at(artifact.input_size) if geometries else [None] * len(working.slots)
    zeroed, gather, channel, counts = [], [], [], []
    for slot, geometry in zip(working.slots, layers, strict=True):
        logical = artifact.switched_off(slot.name, slot.numel)
        zeroed.append(slot.storage_positions(logical))
        counts.append(logical.numel())
        if geometry is not None:
            offsets, out = geometry.gather_offsets(logical)
            gather.append(offsets)
            channel.append(out)
    empty = torch.empty(0, dtype=torch.int64)
    positions, off_bits = torch.cat(zeroed), None
    if geometries is None and positions.numel() > DENSE_FRACTION * working.flat.numel():
        off_bits, positions = _bitmap(positions, working.flat.numel()), empty
    out_channel = torch.cat(channel) if channel else empty
    narrow = torch.int16 if out_channel.numel() == 0 or out_channel.max() < 2**15 else torch.int32
    bn_positions, bn_values = _bn_patch(artifact, working)
    return TaskState(
        zeroed=_int32(positions),
        counts=torch.tensor(counts, dtype=torch.int64),
        gather=_int32(torch.cat(gather) if gather else empty),
        out_channel=out_channel.to(narrow),
        head_weight=artifact.head_weight.float().contiguous(),
        head_bias=artifact.head_bias.float().contiguous(),
        bn_positions=bn_positions,
        bn_values=bn_values,
        input_size=artifact.input_size,
        off_bits=off_bits,
    )


def _bitmap(positions: torch.Tensor, numel: int) -> torch.Tensor:
    off = torch.zeros(numel, dtype=torch.bool)
    off[positions] = True
    return pack_bits(off)


def _bn_patch(artifact: TaskArtifact, working: WorkingCopy) -> tuple[torch.Tensor, torch.Tensor]:
    positions, values = [], []
    for name, tensor in sorted(artifact.bn.items()):
        start = working.bn_offsets[name]
        positions.append(torch.arange(start, start + tensor.numel()))
        values.append(tensor.reshape(-1).float())
    if not positions:
        return torch.empty(0, dtype=torch.int32), torch.empty(0)
    return _int32(torch.cat(positions)), torch.cat(values)


def _int32(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and t.max() > INT32_MAX:
        raise ValueError("a position does not fit int32")
    return t.to(torch.int32)
