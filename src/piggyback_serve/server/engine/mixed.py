"""One forward for a batch that mixes tasks: a dense pass plus a sparse correction per layer.

The working copy runs the batch's lead task (its rows come first). Every other row r, of
task t, needs conv(x, W*M_t); convs and linears are linear in the weights, so

    conv(x, W*M_t) = conv(x, W*M_lead) + conv(x, W*(1-M_lead)) - conv(x, W*(1-M_t))

and both corrections touch only switched-off weights. Each masked layer runs one of two
ways, whichever moves less data for this batch (`_choose`):
- correct: a forward hook adds the corrections for all non-lead rows at once: one
  gather of the input windows each switched-off weight multiplies, one multiply, one
  index_put_ with accumulate into the output. The number of ops per layer does not grow
  with the tasks in the batch: the per-task tables are merged into per-layer index lists
  once per batch (`_plan`), with a handful of vectorised ops over all layers. Cheap where
  few weights meet small feature maps (late layers at small inputs).
- segments: the layer runs once per task block of rows, the lead's rows with the working
  copy, each other block with its own weights rebuilt from the pristine copy (a copy of
  this layer's weights and one indexed write). Cheap where feature maps are large and the
  layer small (early layers), where gathering windows would move more than the weights.
The lead may be the pristine backbone itself (no task, no rows): then every row is
corrected for its own task only.

Linears on token inputs (vision transformers) and convs padded other than with zeros always
run as segments (`LayerGeometry.gatherable`).

Per-task BatchNorm: the norm sites any task of the batch changes get a per-row affine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from piggyback_serve.server.engine.geometry import LayerGeometry, padded
from piggyback_serve.server.engine.layout import Slot
from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.engine.working_copy import Affine, WorkingCopy

# A layer is corrected when GATHER_COST * (gathered input values) is below the weights
# that running it per task block would copy (see `_choose`).
GATHER_COST = 4.0


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of the (reordered) batch belong to one task."""

    state: TaskState
    start: int
    stop: int
    key: tuple[str, str] | None = None  # the task's (name, version); None: pristine


@dataclass(frozen=True)
class LayerPlan:
    gather: torch.Tensor  # int64 [e]: flat index into the tail's padded NHWC input
    rows: torch.Tensor  # int64 [e]: row within the tail
    out_channel: torch.Tensor  # int64 [e]
    value: torch.Tensor  # [e]: +W (lead's switched-off) or -W (the row's task's)


class MixedForward:
    """Context manager: hooks on the masked (and BN) layers for one mixed batch."""

    def __init__(
        self, working: WorkingCopy, layers: list[LayerGeometry], blocks: list[Block]
    ) -> None:
        if not all(b.state.has_corrections for b in blocks):
            raise ValueError("a task state without correction tables (built for per-task)")
        self.working = working
        self.layers = layers
        self.lead = blocks[0]
        self.tail = blocks[1:]
        self.correct = _choose(working, layers, self.lead, self.tail)
        self.plans = _plan(working, layers, self.lead, self.tail, self.correct)
        self._handles: list = []
        self._replaced: list[nn.Module] = []
        self._starts: dict[int, list[int]] = {}
        self._norms_before: dict[int, Affine] | None = None

    def __enter__(self) -> MixedForward:
        slots = self.working.layout.slots
        for index, (slot, layer) in enumerate(zip(slots, self.working.layers, strict=True)):
            if self.plans[index] is not None:
                hook = self._correct(self.layers[index], self.plans[index])
                self._handles.append(layer.register_forward_hook(hook))
            elif not self.correct[index]:
                layer.forward = self._segments(index, slot, layer)
                self._replaced.append(layer)
        if any(b.state.has_bn for b in (self.lead, *self.tail)):
            self._norms_before = self.working.set_norms(self._row_norms())
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._replaced:
            del module.forward  # back to the class's forward
        self._replaced.clear()
        if self._norms_before is not None:
            self.working.set_norms(self._norms_before)

    def _segments(self, index: int, slot: Slot, layer: nn.Module):
        lead_rows = self.lead.stop

        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = [run_layer(layer, x[:lead_rows], layer.weight)] if lead_rows else []
            for block in self.tail:
                weight = self._own_weight(index, slot, block.state)
                outs.append(run_layer(layer, x[block.start : block.stop], weight))
            return torch.cat(outs)

        return forward

    def _own_weight(self, index: int, slot: Slot, state: TaskState) -> torch.Tensor:
        """Layer `index`'s weight as task `state` masks it, built from the pristine copy."""
        starts = self._starts.get(id(state))
        if starts is None:
            starts = self._starts[id(state)] = [0, *torch.cumsum(state.counts, 0).tolist()]
        flat = self.working.base[slot.offset : slot.offset + slot.numel].clone()
        zeroed = state.zeroed[starts[index] : starts[index + 1]]
        if zeroed.numel():
            flat.index_fill_(0, zeroed.long() - slot.offset, 0)
        return flat.as_strided(slot.shape, slot.strides)

    def _row_norms(self) -> dict[int, Affine]:
        """Per norm site any task here changes: (scale, shift) per row, [rows, C]."""
        blocks = (self.lead, *self.tail)
        rows = max(b.stop for b in blocks)
        own = [b.state.norm_affines(self.working.layout) for b in blocks]
        norms = {}
        for site in sorted(set().union(*own)):
            affine = self.working.affines[site]
            channels = self.working.layout.norms[site].channels
            like = self.working.flat
            scale = torch.ones(rows, channels, dtype=like.dtype, device=like.device)
            shift = torch.zeros_like(scale)
            if affine.scale is not None:  # not folded: the backbone's own affine
                scale[:], shift[:] = affine.scale, affine.shift
            for block, affines in zip(blocks, own, strict=True):
                if site in affines:
                    scale[block.start : block.stop], shift[block.start : block.stop] = affines[site]
            norms[site] = (scale, shift)
        return norms

    def _correct(self, geometry: LayerGeometry, plan: LayerPlan):
        lead_rows = self.lead.stop

        def hook(layer: nn.Module, inputs, out: torch.Tensor) -> None:
            x = padded(layer, inputs[0][lead_rows:], geometry)
            tail = out[lead_rows:]
            if geometry.linear:
                picked = x.reshape(-1)[plan.gather]
                tail.index_put_((plan.rows, plan.out_channel), picked * plan.value, True)
                return
            windows = _windows(x, geometry)
            picked = windows[plan.gather] * plan.value[:, None, None]
            tail.index_put_((plan.rows, plan.out_channel), picked, accumulate=True)

        return hook


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `layer` computes on x, with `weight` in place of its own."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    if type(layer).__name__ == "Conv2dSame":
        from timm.layers.conv2d_same import conv2d_same

        return conv2d_same(
            x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
        )
    return layer._conv_forward(x, weight, layer.bias)


def _choose(
    working: WorkingCopy, layers: list[LayerGeometry], lead: Block, tail: list[Block]
) -> list[bool]:
    """Per masked layer: correct (True) or run per task block (False), by data moved."""
    lead_counts = lead.state.counts.tolist()
    gathered = [0] * len(layers)
    for block in tail:
        rows = block.stop - block.start
        own_counts = block.state.counts.tolist()
        for i, (own, other) in enumerate(zip(own_counts, lead_counts, strict=True)):
            gathered[i] += rows * (own + other)
    choice = []
    for slot, geometry, entries in zip(working.layout.slots, layers, gathered, strict=True):
        pixels = geometry.out_hw[0] * geometry.out_hw[1]
        cheap = GATHER_COST * entries * pixels <= len(tail) * slot.numel
        choice.append(geometry.gatherable and cheap)
    return choice


def _windows(x: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """A view [positions, Ho, Wo] of the NHWC input x: element p is the (Ho, Wo) grid of
    input values that a weight whose input offset is p multiplies, one per output pixel."""
    ho, wo = geometry.out_hw
    step_y = geometry.stride[0] * geometry.padded_hw[1] * geometry.channels
    step_x = geometry.stride[1] * geometry.channels
    valid = x.numel() - (ho - 1) * step_y - (wo - 1) * step_x
    return x.as_strided((valid, ho, wo), (1, step_y, step_x))


def _plan(
    working: WorkingCopy,
    layers: list[LayerGeometry],
    lead: Block,
    tail: list[Block],
    correct: list[bool],
) -> list[LayerPlan | None]:
    """Per masked layer to correct, every (tail row, switched-off weight) pair it needs.

    Tail row r of task t gets t's switched-off weights with -W and the lead's with +W.
    """
    device = working.flat.device
    tables = [b.state for b in tail] + [lead.state]
    lengths = torch.tensor([t.zeroed.numel() for t in tables], device=device)
    counts = torch.stack([t.counts.to(device) for t in tables])  # [tables, layers]
    table_start = torch.cumsum(lengths, 0) - lengths
    starts = table_start[:, None] + torch.cumsum(counts, 1) - counts
    counts = counts * torch.tensor(correct, device=device)  # no entries: runs per block
    row_table = torch.cat(
        [torch.full((b.stop - b.start,), i, device=device) for i, b in enumerate(tail)]
    )
    n_rows, n_layers = row_table.numel(), counts.shape[1]
    pair = torch.stack([row_table, torch.full_like(row_table, len(tail))], dim=1)  # [rows, 2]
    # Segments in layer-major order: for each layer, each tail row, (own table, lead table).
    seg_start = starts[pair].permute(2, 0, 1).reshape(-1)
    seg_len = counts[pair].permute(2, 0, 1).reshape(-1)
    seg_row = torch.arange(n_rows, device=device)[None, :, None].expand(n_layers, n_rows, 2)
    seg_sign = torch.tensor([-1.0, 1.0], device=device, dtype=working.flat.dtype)
    seg_sign = seg_sign.expand(n_layers, n_rows, 2).reshape(-1)
    per_layer = seg_len.view(n_layers, -1).sum(1)
    total = int(per_layer.sum())
    shift = seg_start - (torch.cumsum(seg_len, 0) - seg_len)
    index = torch.repeat_interleave(shift, seg_len, output_size=total)
    index += torch.arange(total, device=device)
    rows = torch.repeat_interleave(seg_row.reshape(-1), seg_len, output_size=total)
    sign = torch.repeat_interleave(seg_sign, seg_len, output_size=total)

    zeroed = torch.cat([t.zeroed for t in tables])[index]
    value = working.base[zeroed] * sign
    row_stride = torch.tensor([g.row_stride for g in layers], device=device)
    row_stride = torch.repeat_interleave(row_stride, per_layer, output_size=total)
    gather = torch.cat([t.gather for t in tables])[index].long() + rows * row_stride
    channel = torch.cat([t.out_channel for t in tables])[index].long()
    sizes = per_layer.tolist()
    return [
        LayerPlan(g, r, c, v) if size else None
        for g, r, c, v, size in zip(
            gather.split(sizes),
            rows.split(sizes),
            channel.split(sizes),
            value.split(sizes),
            sizes,
            strict=True,
        )
    ]
