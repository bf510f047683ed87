"""One engine worker: owns one device, its working copy of the backbone, and runs batches
that may mix tasks (`step`).

A task is a sparse patch of the working copy (server/engine/task_state.py). A batch runs as:
- one task: patch the working copy to it (cheap: only switched-off weights move), then a
  plain forward of the module;
- several tasks, per task: the batch split by task, the copy patched before each piece,
  the task the copy already runs first. The default on the CPU, where a small batch costs
  nearly what a big one does and the corrections move data at a few ns a value
  (bench/results/MULTITASK.md);
- several tasks, one pass: rows reordered by task, the copy patched to a lead task (or
  left pristine), one forward with a sparse correction per layer for the other rows
  (server/engine/mixed.py); the default elsewhere.
Heads apply per task. Pixels arrive as uint8 and are normalised here, per row with its
task's mean and std, in one op per batch on the device.
A worker is single-owner: only the thread or process that built it calls it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from piggyback_serve.masks.artifact import TaskArtifact
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.server.engine import task_state
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.geometry import Geometries
from piggyback_serve.server.engine.layout import Template
from piggyback_serve.server.engine.mixed import Block, MixedForward
from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.engine.tier import Tier
from piggyback_serve.server.engine.working_copy import WorkingCopy

TaskKey = tuple[str, str]  # (name, version)


@dataclass(frozen=True)
class Row:
    """What the worker needs of one image's task: who it is and its state."""

    key: TaskKey
    state: TaskState


@dataclass
class WorkerStats:
    switches: int = 0  # working-copy patches (the task it runs changed)
    batches: int = 0
    mixed: int = 0  # batches with more than one task


class Worker:
    def __init__(self, config: WorkerConfig, template: Template):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.one_pass = config.one_pass
        # The template may be shared (between workers of one process, or mapped from the
        # pool's shared memory): the module is copied, only the pristine buffer is shared.
        self.module = copy.deepcopy(template.module).to(self.device, self.dtype)
        self.layout = template.layout
        base = template.base.to(self.device, self.dtype)
        self.working = WorkingCopy(self.module, self.layout, base)
        self.geometries = Geometries(self.module, self.layout.slots)
        self.forward = torch.compile(self.module) if config.compile else self.module
        self.stats = WorkerStats()
        # Device copies of task states (CPU float32: none, the shared states are used).
        self.device_tier = Tier(_device_budget(config, self.device))

    @classmethod
    def local(cls, config: WorkerConfig, backbone: Backbone) -> Worker:
        """A worker in this thread, on its own template (tests, benchmarks)."""
        return cls(config, Template.of(backbone))

    def prepare(self, artifact: TaskArtifact) -> TaskState:
        """A validated artifact's task state (CPU), as the pool builds it."""
        return task_state.build(artifact, self.layout, self.geometries if self.one_pass else None)

    def step(self, rows: list[Row], pixels: torch.Tensor) -> list[torch.Tensor]:
        """Softmax probabilities per row (float32, on the CPU), row i classified by its task.

        `pixels`: uint8 [n, 3, S, S] as decoded (normalised here), or already normalised."""
        order, blocks = self._blocks(rows) if self.one_pass else self._pieces(rows)
        with torch.inference_mode():
            x = self._normalise(rows, pixels)
            if len(blocks) > 1:
                x = x[torch.tensor(order, device=self.device)]
            x = x.contiguous(memory_format=torch.channels_last)
            if len(blocks) == 1:
                features = self._forward(blocks[0], x)
            elif not self.one_pass:
                features = torch.cat([self._forward(b, x[b.start : b.stop]) for b in blocks])
            else:
                self._switch(blocks[0].key, blocks[0].state)
                layers = self.geometries.at(blocks[-1].state.input_size)
                with MixedForward(self.working, layers, blocks):
                    features = self.module(x)  # eager: the corrections are hooks
            self.stats.mixed += len(blocks) > 1
            self.stats.batches += 1
            probs = [None] * len(rows)
            for block in blocks:
                if block.stop == block.start:
                    continue
                p = _classify(features[block.start : block.stop], block.state).cpu()
                for j, row_index in enumerate(order[block.start : block.stop]):
                    probs[row_index] = p[j]
            return probs

    def _normalise(self, rows: list[Row], pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> (x / 255 - mean) / std per row, as masks.data.to_tensor computes."""
        if pixels.dtype != torch.uint8:
            return pixels.to(self.device, self.dtype, non_blocking=True)
        x = pixels.to(self.device, non_blocking=True).float() / 255.0
        mean = torch.tensor([row.state.mean for row in rows], device=self.device)
        std = torch.tensor([row.state.std for row in rows], device=self.device)
        x = (x - mean[:, :, None, None]) / std[:, :, None, None]
        return x.to(self.dtype)

    def _forward(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """Features of one task's rows: the working copy patched to it, a plain forward."""
        self._switch(block.key, block.state)
        return self.forward(x)

    def _pieces(self, rows: list[Row]) -> tuple[list[int], list[Block]]:
        """Rows reordered by task, the task the working copy runs now (if any) first."""
        by_key = _by_task(rows)
        order, blocks = [], []
        for key in sorted(by_key, key=lambda k: k != self.working.patched):
            members = by_key[key]
            state = self._device_state(key, rows[members[0]].state)
            blocks.append(Block(state, len(order), len(order) + len(members), key))
            order.extend(members)
        return order, blocks

    def _blocks(self, rows: list[Row]) -> tuple[list[int], list[Block]]:
        """Rows reordered by task for one pass, lead block first (the task the working
        copy runs; key None: the pristine backbone).

        One task: it leads. Several: the lead minimises the switched-off weights to correct
        (a tail row of task t corrects |t| + |lead| of them), which makes the pristine
        backbone (no rows, |lead| = 0) the lead unless one task holds over half the rows.
        """
        by_key = _by_task(rows)
        states = {key: self._device_state(key, rows[m[0]].state) for key, m in by_key.items()}
        n, patched = len(rows), self.working.patched

        def extra(key: TaskKey) -> tuple[int, bool]:  # cost of leading, vs the pristine copy
            members = len(by_key[key])
            cost = 0 if n == members else (n - 2 * members) * states[key].zeroed.numel()
            return cost, key != patched

        lead = min(by_key, key=extra)
        order, blocks = [], []
        if len(by_key) > 1 and extra(lead)[0] > 0:
            lead = None
            blocks.append(Block(_pristine(states), 0, 0, None))
        for key in sorted(by_key, key=lambda k: k != lead):
            members = by_key[key]
            blocks.append(Block(states[key], len(order), len(order) + len(members), key))
            order.extend(members)
        return order, blocks

    @property
    def copies_states(self) -> bool:
        """Whether task states are copied (to the device, or to its dtype): not on the
        CPU in float32, where the pool's shared states are used as they are."""
        return self.device.type != "cpu" or self.dtype != torch.float32

    def _device_state(self, key: TaskKey, state: TaskState) -> TaskState:
        if not self.copies_states:
            return state
        found = self.device_tier.get(key)
        if found is None:
            found = state.to(self.device, self.dtype)
            self.device_tier.put(key, found)  # an evicted copy a batch holds stays valid
        return found

    def _switch(self, key: TaskKey | None, state: TaskState) -> None:
        if key != self.working.patched:
            norms = state.norm_affines(self.layout)
            self.working.switch(key, state.zeroed, state.off_bits, norms)
            self.stats.switches += 1

    def forget(self, keys: list[TaskKey]) -> None:
        """Drop the device copies of these tasks (deleted or replaced). The working copy
        may still run one: it is restored at the next switch."""
        for key in keys:
            self.device_tier.drop(key)

    @property
    def device_state_bytes(self) -> int:
        return self.device_tier.bytes


def _device_budget(config: WorkerConfig, device: torch.device) -> int:
    """Bytes of device copies to keep: the configured budget, or a quarter of what the
    device has free now (host memory for a CPU worker in another dtype)."""
    if config.device_state_bytes is not None:
        return config.device_state_bytes
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def _pristine(states: dict[TaskKey, TaskState]) -> TaskState:
    """The backbone as it is, as a task state: nothing switched off, no head."""
    like = next(iter(states.values()))
    return TaskState(
        zeroed=like.zeroed[:0],
        counts=torch.zeros_like(like.counts),
        gather=like.gather[:0],
        out_channel=like.out_channel[:0],
        head_weight=like.head_weight[:0],
        head_bias=like.head_bias[:0],
        norm_sites=like.norm_sites[:0],
        norm_values=like.norm_values[:, :0],
        input_size=like.input_size,
        mean=like.mean,
        std=like.std,
    )


def _by_task(rows: list[Row]) -> dict[TaskKey, list[int]]:
    """Row indices per task, tasks in order of first appearance."""
    by_key: dict[TaskKey, list[int]] = {}
    for i, row in enumerate(rows):
        by_key.setdefault(row.key, []).append(i)
    return by_key


def _classify(features: torch.Tensor, state: TaskState) -> torch.Tensor:
    logits = torch.nn.functional.linear(features.float(), state.head_weight, state.head_bias)
    return torch.softmax(logits, dim=-1)
