"""The engine: owns the device and the backbone, runs batches that may mix tasks.

The backbone's masked weights live in one working copy (server/working_copy.py); a task
is a sparse patch of it (server/task_state.py). A batch runs as:
- one task: patch the working copy to it (cheap: only switched-off weights move), then a
  plain forward of the module;
- several tasks, one-pass: rows reordered by task, the copy patched to a lead task (or
  left pristine), one forward with a sparse correction per layer for the other rows
  (server/mixed.py); heads apply per task;
- several tasks, per-task: the batch split by task, the copy patched before each piece.
  The default on the CPU (setting `mixed_batches`): there a small batch costs nearly what
  a big one does and the corrections move data at a few ns a value, so per task was
  1.06-2.1x faster on resnet18 and, on EfficientNet-Lite0, faster at 2-4 tasks and as
  fast to 1.4x slower at 8 tasks x 1 row (bench/results/MULTITASK.md, two runs).
Everything that touches the working copy runs on ONE worker thread.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from masks.artifact import TaskArtifact
from masks.backbones import Backbone, load_backbone
from server import task_state
from server.geometry import Geometries
from server.mixed import Block, MixedForward
from server.settings import Settings
from server.task_state import TaskState
from server.working_copy import WorkingCopy

log = logging.getLogger("piggy.serve")

TaskKey = tuple[str, str]  # (name, version)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Row:
    """What the engine needs of one image's task: who it is and its state."""

    key: TaskKey
    state: TaskState


@dataclass
class EngineStats:
    switches: int = 0  # working-copy patches (the lead task changed)
    batches: int = 0
    mixed_batches: int = 0  # batches with more than one task


class Engine:
    def __init__(self, settings: Settings, backbone: Backbone | None = None):
        self.device = resolve_device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        self.backbone_name = settings.backbone
        self.backbone_weights = settings.backbone_weights
        mode = settings.mixed_batches
        if mode == "auto":
            mode = "per-task" if self.device.type == "cpu" else "one-pass"
        self.one_pass = mode == "one-pass"
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="piggy-engine")
        self.backbone = backbone
        self.load_error: str | None = None
        self.working: WorkingCopy | None = None
        self.geometries: Geometries | None = None
        self.stats = EngineStats()
        self._on_device: dict[TaskKey, TaskState] = {}  # device copies (CPU: the same)
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.working is not None and self.load_error is None

    async def start(self) -> Backbone:
        """Load the backbone (once), put it on the device, build the working copy."""
        return await self._call(self._load)

    def _load(self) -> Backbone:
        backbone = self.backbone
        if backbone is None:
            started = time.perf_counter()
            backbone = load_backbone(self.backbone_name, self.backbone_weights)
            log.info("backbone %s loaded in %.1fs", backbone.name, time.perf_counter() - started)
        else:
            # The working copy patches the module's weights in place: a backbone handed in
            # (and perhaps shared with the caller) is copied, so no patch leaks out.
            backbone = dataclasses.replace(backbone, module=copy.deepcopy(backbone.module))
        # channels_last: oneDNN's CPU convolutions run 1.25-1.5x faster in it (measured:
        # EfficientNet-Lite0 b8 224 px, resnet18 b16 64 px); the working copy keeps it.
        backbone.module.to(self.device, self.dtype, memory_format=torch.channels_last)
        self.working = WorkingCopy(backbone)
        self.geometries = Geometries(backbone.module, self.working.slots)
        self.backbone = backbone
        return backbone

    def prepare(self, artifact: TaskArtifact) -> TaskState:
        """A validated artifact's task state (CPU). Thread-safe: call it off the engine."""
        if self.working is None:
            raise RuntimeError("the engine has not started")
        geometries = self.geometries if self.one_pass else None  # tables for one pass only
        return task_state.build(artifact, self.working, geometries)

    async def predict(self, rows: list[Row], batch: torch.Tensor) -> list[torch.Tensor]:
        """Softmax probabilities per row (float32, on the CPU), row i classified by its task."""
        return await self._call(self._predict, rows, batch)

    def _predict(self, rows: list[Row], batch: torch.Tensor) -> list[torch.Tensor]:
        order, blocks = self._blocks(rows) if self.one_pass else self._pieces(rows)
        with torch.inference_mode():
            x = batch.to(self.device, self.dtype, non_blocking=True)
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
                    features = self.backbone.module(x)
            self.stats.mixed_batches += len(blocks) > 1
            self.stats.batches += 1
            probs = [None] * len(rows)
            for block in blocks:
                if block.stop == block.start:
                    continue
                p = _classify(features[block.start : block.stop], block.state).cpu()
                for j, row_index in enumerate(order[block.start : block.stop]):
                    probs[row_index] = p[j]
            return probs

    def _forward(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """Features of one task's rows: the working copy patched to it, a plain forward."""
        self._switch(block.key, block.state)
        return self.backbone.module(x)

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
            blocks.append(Block(self._pristine(states), 0, 0, None))
        for key in sorted(by_key, key=lambda k: k != lead):
            members = by_key[key]
            blocks.append(Block(states[key], len(order), len(order) + len(members), key))
            order.extend(members)
        return order, blocks

    def _pristine(self, states: dict[TaskKey, TaskState]) -> TaskState:
        """The backbone as it is, as a task state: nothing switched off, no head."""
        like = next(iter(states.values()))
        return TaskState(
            zeroed=like.zeroed[:0],
            counts=torch.zeros_like(like.counts),
            gather=like.gather[:0],
            out_channel=like.out_channel[:0],
            head_weight=like.head_weight[:0],
            head_bias=like.head_bias[:0],
            bn_positions=like.bn_positions[:0],
            bn_values=like.bn_values[:0],
            input_size=like.input_size,
        )

    def _device_state(self, key: TaskKey, state: TaskState) -> TaskState:
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return state
        with self._lock:
            found = self._on_device.get(key)
            if found is None:
                found = self._on_device[key] = state.to(self.device, self.dtype)
            return found

    def _switch(self, key: TaskKey | None, state: TaskState) -> None:
        if key != self.working.patched:
            self.working.switch(
                key, state.zeroed, state.bn_positions, state.bn_values, state.off_bits
            )
            self.stats.switches += 1

    def forget(self, name: str) -> None:
        """Drop the device copies of every version of task `name` (deleted or replaced).

        A request already waiting still runs with the state it was submitted with."""
        with self._lock:
            for key in [k for k in self._on_device if k[0] == name]:
                del self._on_device[key]

    @property
    def device_state_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._on_device.values())

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _by_task(rows: list[Row]) -> dict[TaskKey, list[int]]:
    """Row indices per task, tasks in order of first appearance."""
    by_key: dict[TaskKey, list[int]] = {}
    for i, row in enumerate(rows):
        by_key.setdefault(row.key, []).append(i)
    return by_key


def _classify(features: torch.Tensor, state: TaskState) -> torch.Tensor:
    logits = torch.nn.functional.linear(features.float(), state.head_weight, state.head_bias)
    return torch.softmax(logits, dim=-1)
