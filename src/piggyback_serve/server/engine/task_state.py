"""A task as the engine holds it: a sparse patch of the working copy, its head and its BN.

Built once when the task is registered (off the engine thread), from the artifact:
- `zeroed`: the flat working-copy positions of the weights it switches off (int32,
  layer by layer in slot order), with `counts` per layer;
- `gather`/`out_channel`: for each of those weights, where its input lives in an image of
  the layer's padded input and which output channel it feeds: what the one-pass mixed
  batch's correction needs (server/engine/mixed.py); built only for an engine that runs mixed
  batches in one pass (empty otherwise: 4 bytes per switched-off weight instead of 10);
- `off_bits`: instead of `zeroed`, for a task that switches off over DENSE_FRACTION of
  the weights (per-task engines only): the flat mask bit-packed, 1 = switched off. Past
  a fifth a bitmap is over 6x smaller than positions (1 bit a weight against 4 bytes a
  position) while a switch then costs a dense restore and fill instead of scattered
  writes, so below that fraction positions are smaller and cheaper to apply;
- the head, and for a task with its own BatchNorm the per-channel affine it applies on
  each norm site it changes (server/engine/fold.py), with the sites' indices;
- its input's mean and std: pixels reach the worker as uint8 and are normalised there.
Nothing dense per task: memory grows with the weights a task switches off, up to a bit
per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.codec import pack_bits
from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.server.engine.geometry import Geometries
from piggyback_serve.server.engine.layout import Layout
from piggyback_serve.server.engine.working_copy import Affine

INT32_MAX = 2**31 - 1
# Past this fraction of the masked weights switched off, a task is kept as a bitmap.
DENSE_FRACTION = 1 / 5
SEGMENT_ALIGN = 64  # bytes: each tensor of a shared state starts on a cache line


@dataclass(frozen=True)
class TaskState:
    zeroed: torch.Tensor  # int32 [n]
    counts: torch.Tensor  # int64 [layers]
    gather: torch.Tensor  # int32 [n]
    out_channel: torch.Tensor  # int16 [n] (int32 past 32k channels)
    head_weight: torch.Tensor  # float32 [labels, features]
    head_bias: torch.Tensor  # float32 [labels]
    norm_sites: torch.Tensor  # int64 [k]: the norm sites of its own BN, empty without
    norm_values: torch.Tensor  # [2, channels of those sites]: scale, shift, site by site
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    off_bits: torch.Tensor | None = None  # uint8, the flat mask packed (1 = off); see above

    @property
    def has_bn(self) -> bool:
        return self.norm_sites.numel() > 0

    def norm_affines(self, layout: Layout) -> dict[int, Affine]:
        """Norm site -> the (scale, shift) this task applies there (views of norm_values)."""
        sites = self.norm_sites.tolist()
        sizes = [layout.norms[site].channels for site in sites]
        pieces = self.norm_values.split(sizes, dim=1) if sites else ()
        return {site: (piece[0], piece[1]) for site, piece in zip(sites, pieces, strict=True)}

    def share_memory_(self) -> TaskState:
        """This state with every tensor a view into one shared-memory segment: worker
        processes map it instead of copying it, and a task costs one segment (one mapping)
        however many tensors it has (with the pool's file_system sharing, no open file)."""
        tensors = self._tensors()
        offsets, end = {}, 0
        for name, tensor in tensors.items():
            offsets[name] = -(-end // SEGMENT_ALIGN) * SEGMENT_ALIGN
            end = offsets[name] + tensor.nbytes
        segment = torch.empty(max(end, 1), dtype=torch.uint8).share_memory_()
        views = {}
        for name, tensor in tensors.items():
            start = offsets[name]
            view = segment[start : start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            views[name] = view.copy_(tensor)
        return replace(self, **views)

    @property
    def has_corrections(self) -> bool:
        """Whether the one-pass correction tables were built (see `build`)."""
        return self.off_bits is None and self.gather.numel() == self.zeroed.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors().values())

    def to(self, device: torch.device, dtype: torch.dtype) -> TaskState:
        """On the worker's device; norm values in its dtype, the head stays float32."""
        moved = {k: t.to(device, non_blocking=True) for k, t in self._tensors().items()}
        moved["norm_values"] = moved["norm_values"].to(dtype)
        return replace(self, **moved)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


def build(artifact: TaskArtifact, layout: Layout, geometries: Geometries | None) -> TaskState:
    """The task state of a validated artifact (CPU tensors); with `geometries`, the
    one-pass correction tables too."""
    layers = geometries.at(artifact.input_size) if geometries else [None] * len(layout.slots)
    zeroed, gather, channel, counts = [], [], [], []
    for slot, geometry in zip(layout.slots, layers, strict=True):
        logical = artifact.switched_off(slot.name, slot.numel)
        zeroed.append(slot.storage_positions(logical))
        counts.append(logical.numel())
        if geometry is not None:
            offsets, out = geometry.gather_offsets(logical)
            gather.append(offsets)
            channel.append(out)
    empty = torch.empty(0, dtype=torch.int64)
    positions, off_bits = torch.cat(zeroed), None
    if geometries is None and positions.numel() > DENSE_FRACTION * layout.numel:
        off_bits, positions = _bitmap(positions, layout.numel), empty
    out_channel = torch.cat(channel) if channel else empty
    narrow = torch.int16 if out_channel.numel() == 0 or out_channel.max() < 2**15 else torch.int32
    norm_sites, norm_values = _norm_patch(artifact, layout)
    return TaskState(
        zeroed=_int32(positions),
        counts=torch.tensor(counts, dtype=torch.int64),
        gather=_int32(torch.cat(gather) if gather else empty),
        out_channel=out_channel.to(narrow),
        head_weight=artifact.head_weight.float().contiguous(),
        head_bias=artifact.head_bias.float().contiguous(),
        norm_sites=norm_sites,
        norm_values=norm_values,
        input_size=artifact.input_size,
        mean=tuple(float(v) for v in artifact.mean),
        std=tuple(float(v) for v in artifact.std),
        off_bits=off_bits,
    )


def _bitmap(positions: torch.Tensor, numel: int) -> torch.Tensor:
    off = torch.zeros(numel, dtype=torch.bool)
    off[positions] = True
    return pack_bits(off)


def _norm_patch(artifact: TaskArtifact, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The sites where the task has its own BN, and the (scale, shift) it applies there."""
    own: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in artifact.bn.items():
        layer, _, suffix = key.rpartition(".")
        own.setdefault(layer, {})[suffix] = tensor
    unknown = sorted(set(own) - set(layout.norm_index))
    if unknown:
        raise ArtifactError(
            f"bn.{unknown[0]}",
            "this per-task norm layer is not supported by the engine (one with an activation "
            "inside, or a zero in its weight)",
        )
    sites = sorted(layout.norm_index[name] for name in own)
    if not sites:
        return torch.empty(0, dtype=torch.int64), torch.empty(2, 0)
    pairs = [layout.norms[i].task_affine(own[layout.norms[i].name]) for i in sites]
    values = torch.stack([torch.cat([s for s, _ in pairs]), torch.cat([b for _, b in pairs])])
    return torch.tensor(sites, dtype=torch.int64), values


def _int32(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and t.max() > INT32_MAX:
        raise ValueError("a position does not fit int32")
    return t.to(torch.int32)
