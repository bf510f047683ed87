"""One worker's working copy of the masked weights, patched in place to the task it runs.

Every Conv2d/Linear weight that tasks mask is a view into ONE flat buffer of the worker's
own (in the layout the module runs in, channels_last for convs), beside the pristine
buffer every worker shares (server/engine/layout.py). Switching the copy from one task to
another is then two indexed writes over the whole model: put back the weights the old task
switched off, zero the ones the new task switches off. The forward is the plain module, no
tensors swapped per call. BatchNorm is folded into the convs; a task with its own norm
sets a per-channel affine on the few layers it changes (server/engine/fold.py).
"""

from __future__ import annotations

import torch
from torch import nn

from piggyback_serve.masks.codec import unpack_bits
from piggyback_serve.server.engine.fold import ChannelAffine
from piggyback_serve.server.engine.layout import Layout

Affine = tuple[torch.Tensor, torch.Tensor]  # (scale, shift) per channel


class WorkingCopy:
    """The masked weights of `module`, rebound as views of a flat buffer copied from `base`.

    `patched` is the key of the task whose switched-off weights are zeroed now (None: none).
    Only the worker that owns it calls `switch`.
    """

    def __init__(self, module: nn.Module, layout: Layout, base: torch.Tensor):
        self.layout = layout
        self.base = base
        self.flat = base.clone()
        layers = dict(module.named_modules())
        for slot in layout.slots:
            view = slot.view(self.flat)
            layers[slot.module].weight = nn.Parameter(view, requires_grad=False)
        self.layers: list[nn.Module] = [layers[slot.module] for slot in layout.slots]
        self.affines: list[ChannelAffine] = [layers[site.module] for site in layout.norms]
        self.patched = None
        self._dense = False  # the patched task came as a bitmap: restore densely
        self._zeroed = torch.empty(0, dtype=torch.int32, device=self.flat.device)
        self._norms: dict[int, Affine] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the working copy and its pristine twin (shared between workers)."""
        return self.flat.nbytes + self.base.nbytes

    def switch(
        self,
        key,
        zeroed: torch.Tensor,
        off_bits: torch.Tensor | None = None,
        norms: dict[int, Affine] | None = None,
    ) -> None:
        """Make the copy run task `key`: switched-off flat positions `zeroed` (int32, on the
        device) or, for a task that switches off many, `off_bits` (the flat mask packed,
        1 = off), and its own norm affines by norm site (none for a task without BN)."""
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
        self.set_norms(norms or {})
        self._zeroed, self.patched = zeroed, key

    def set_norms(self, norms: dict[int, Affine]) -> dict[int, Affine]:
        """Put these per-channel affines on their norm sites (the others: the backbone's);
        returns the ones set before."""
        before = self._norms
        for site in before:
            self.affines[site].task = None
        for site, affine in norms.items():
            self.affines[site].task = affine
        self._norms = norms
        return before

    def reset(self) -> None:
        """Back to the pristine backbone (no task)."""
        self.switch(None, self._zeroed[:0])
