"""Artifact format 2 on the bundled demo tasks: size against the masks' entropy, decode time.

Three figures, over the demo tasks in src/piggyback_serve/masks/demo_tasks/ (each read as
format-2 bytes, converted in memory first if a file is still format 1):
- bits per masked weight: the whole file's bytes * 8 / the backbone's masked weights (worst);
- bytes per task / (entropy of its masks + head): the entropy is each parameter's binary
  entropy H(off / numel) * numel summed (a tighter bound than one rate for all), the head
  float32; worst over the tasks that switch any weight off (a task that switches none has
  zero entropy, so the file's fixed metadata alone decides its ratio: reported, not ranked);
- decode / batch-1 forward: format-2 bytes -> validated artifact -> the engine's task
  state (Worker.prepare, as a replica registers an upload; the CPU engine's, which runs
  mixed batches per task), over a batch-1 forward of the backbone at the task's input
  size on the CPU; medians of interleaved repeats, worst task. Both on one CPU thread: the
  decode is single-threaded numpy, so this compares CPU seconds; it also keeps the forward
  clear of the thread stalls that a shared machine causes (on 2 busy cores a 2-thread
  batch-1 forward measured 5x slower than a 1-thread one).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import timing
from piggyback_serve.masks import artifact, codec, demo
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.server.engine import Worker
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.task_state import TaskState

REPEATS = 9

ROW_BITS = "bits per masked weight, demo tasks (worst)"
ROW_ENTROPY = "bytes per task ÷ (entropy of its masks + head)"
ROW_DECODE = "decode ÷ batch-1 forward"


@dataclass
class TaskSize:
    name: str
    format_1_bytes: int
    format_2_bytes: int
    masked: int
    switched_off: int
    entropy_bytes: float
    head_bytes: int
    codings: dict[str, int]
    decode_s: float
    forward_s: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.format_2_bytes / self.masked

    @property
    def over_entropy(self) -> float:
        return self.format_2_bytes / (self.entropy_bytes + self.head_bytes)

    @property
    def decode_over_forward(self) -> float:
        return self.decode_s / self.forward_s


def binary_entropy_bytes(off: int, numel: int) -> float:
    p = off / numel
    if p in (0.0, 1.0):
        return 0.0
    return numel * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def to_task_state(data: bytes, backbone: Backbone, engine: Worker) -> TaskState:
    """What a replica does with an uploaded task: bytes -> validated artifact -> the state
    the engine patches its working copy with."""
    return engine.prepare(artifact.load(data, backbone))


def measure_task(path: Path, backbone: Backbone, engine: Worker) -> TaskSize:
    art = artifact.load(path, backbone)
    data = artifact.to_bytes(art)  # format 2 whatever the file's format
    numels = {n: w.numel() for n, w in backbone.maskable().items()}
    offs = {name: art.switched_off(name, numel) for name, numel in numels.items()}
    codings: dict[str, int] = {}
    for mask in art.masks.values():
        coding = mask.coded()[0]
        codings[coding] = codings.get(coding, 0) + 1
    decode_s, forward_s = _timings(data, backbone, engine, art.input_size)
    return TaskSize(
        name=path.stem,
        format_1_bytes=len(artifact.to_bytes(art, "1")),
        format_2_bytes=len(data),
        masked=sum(numels.values()),
        switched_off=sum(o.numel() for o in offs.values()),
        entropy_bytes=sum(binary_entropy_bytes(offs[n].numel(), numels[n]) for n in numels),
        head_bytes=4 * (art.head_weight.numel() + art.head_bias.numel())
        + sum(4 * t.numel() for t in art.bn.values()),
        codings=codings,
        decode_s=decode_s,
        forward_s=forward_s,
    )


@torch.inference_mode()
def _timings(data, backbone, engine, size) -> tuple[float, float]:
    """Median seconds of a decode and of a batch-1 forward, one thread, interleaved."""
    module = backbone.module.eval()
    x = torch.randn(1, 3, size, size)
    decodes, forwards = [], []
    for _ in range(REPEATS):  # interleaved: a busy machine slows both alike
        decodes.append(timing.ms(lambda: to_task_state(data, backbone, engine), 0.05, threads=1))
        forwards.append(timing.ms(lambda: module(x), 0.05, threads=1))
    return statistics.median(decodes) / 1e3, statistics.median(forwards) / 1e3


def measure_all(folder: Path = demo.BUNDLED_DIR) -> list[TaskSize]:
    backbone = demo.load_demo_backbone()
    config = WorkerConfig(index=0, device="cpu", dtype="float32", threads=1, one_pass=False)
    engine = Worker.local(config, backbone)
    return [measure_task(p, backbone, engine) for p in sorted(folder.glob("*.safetensors"))]


def figures(rows: list[TaskSize] | None = None) -> dict[str, float]:
    """The three summary figures, worst over the demo tasks."""
    rows = rows if rows is not None else measure_all()
    informative = [r for r in rows if r.switched_off] or rows
    return {
        ROW_BITS: round(max(r.bits_per_weight for r in rows), 3),
        ROW_ENTROPY: round(max(r.over_entropy for r in informative), 3),
        ROW_DECODE: round(max(r.decode_over_forward for r in rows), 3),
    }


def density_rows(backbone: Backbone, n_labels: int = 10) -> list[list]:
    """Format 2 at denser masks: an Elias–Fano stream's size depends on (count, numel) alone,
    so these are exact for any positions with that fraction off in every parameter."""
    numels = [w.numel() for w in backbone.maskable().values()]
    masked, head = sum(numels), 4 * (n_labels * backbone.num_features + n_labels)
    rows = []
    for fraction in (0.012, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50):
        counts = [round(fraction * u) for u in numels]
        codings = [codec.smallest(n, u) for n, u in zip(counts, numels, strict=True)]
        coded = sum(map(codec.coded_size, codings, counts, numels))
        entropy = sum(map(binary_entropy_bytes, counts, numels))
        rows.append(
            [
                100 * fraction,
                8 * coded / masked,
                8 * (coded + head) / masked,
                (coded + head) / (entropy + head),
                "/".join(sorted(set(codings))),
                8 * sum(counts),
            ]
        )
    return rows


def measure(ctx) -> dict:
    rows = measure_all()
    return {
        "tasks": [dataclasses.asdict(r) for r in rows],
        "density": density_rows(demo.load_demo_backbone()),
    }


def summarize(raw: dict) -> dict:
    rows = [TaskSize(**r) for r in raw["tasks"]]
    figs = [{"figure": f, "on": None, "value": v} for f, v in figures(rows).items()]
    tasks = [
        [
            r.name,
            100 * r.switched_off / r.masked,
            r.format_1_bytes,
            r.format_2_bytes,
            r.bits_per_weight,
            r.entropy_bytes + r.head_bytes,
            r.over_entropy,
            ", ".join(f"{n} {c}" for c, n in sorted(r.codings.items())),
            1e3 * r.decode_s,
            1e3 * r.forward_s,
            r.decode_over_forward,
        ]
        for r in rows
    ]
    return {"figures": figs, "tables": {"tasks": tasks, "density": raw["density"]}}
