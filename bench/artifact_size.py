"""Artifact format 2 on the bundled demo tasks: size against the masks' entropy, decode time.

    python -m bench.artifact_size      # prints the figures, writes bench/results/artifact_size.md

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

import math
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from piggyback_serve.masks import artifact, codec, demo
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.server.engine import Worker
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.task_state import TaskState

RESULTS = Path(__file__).parent / "results" / "artifact_size.md"
REPEATS = 15

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


def measure(path: Path, backbone: Backbone, engine: Worker) -> TaskSize:
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _interleaved(data, backbone, engine, size)
    finally:
        torch.set_num_threads(threads)


def _interleaved(data, backbone, engine, size) -> tuple[float, float]:
    module = backbone.module.eval()
    x = torch.randn(1, 3, size, size)
    for _ in range(3):
        to_task_state(data, backbone, engine), module(x)
    decodes, forwards = [], []
    for _ in range(REPEATS):  # interleaved: a busy machine slows both alike
        start = time.perf_counter()
        to_task_state(data, backbone, engine)
        decodes.append(time.perf_counter() - start)
        start = time.perf_counter()
        module(x)
        forwards.append(time.perf_counter() - start)
    return statistics.median(decodes), statistics.median(forwards)


def measure_all(folder: Path = demo.BUNDLED_DIR) -> list[TaskSize]:
    backbone = demo.load_demo_backbone()
    config = WorkerConfig(index=0, device="cpu", dtype="float32", threads=1, one_pass=False)
    engine = Worker.local(config, backbone)
    return [measure(p, backbone, engine) for p in sorted(folder.glob("*.safetensors"))]


def figures(rows: list[TaskSize] | None = None) -> dict[str, float]:
    """The issue's three summary figures, worst over the demo tasks."""
    rows = rows if rows is not None else measure_all()
    informative = [r for r in rows if r.switched_off] or rows
    return {
        ROW_BITS: round(max(r.bits_per_weight for r in rows), 3),
        ROW_ENTROPY: round(max(r.over_entropy for r in informative), 3),
        ROW_DECODE: round(max(r.decode_over_forward for r in rows), 3),
    }


def density_rows(backbone: Backbone, n_labels: int = 10) -> list[str]:
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
            f"| {100 * fraction:.1f}% | {8 * coded / masked:.3f} | "
            f"{8 * (coded + head) / masked:.3f} | {(coded + head) / (entropy + head):.2f} | "
            f"{'/'.join(sorted(set(codings)))} | {8 * sum(counts) / 1e6:.1f} MB |"
        )
    return rows


def report(rows: list[TaskSize], backbone: Backbone) -> str:
    figs = figures(rows)
    lines = [
        "# Task artifact size (format 2) and decode time",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m bench.artifact_size`"
        " (decode and forward on one CPU thread each; the machine was shared, so the times"
        " are medians of interleaved repeats and the ratio is the stable part).",
        "",
        "| figure | goal | measured |",
        "| --- | --- | --- |",
        f"| `{ROW_BITS}` | ≤ 0.25 | {figs[ROW_BITS]} |",
        f"| `{ROW_ENTROPY}` | ≤ 1.3 | {figs[ROW_ENTROPY]} |",
        f"| `{ROW_DECODE}` | ≤ 0.5 | {figs[ROW_DECODE]} |",
        "",
        "| task | switched off | format 1 bytes | format 2 bytes | bits/weight | entropy + head"
        " bytes | ÷ (entropy + head) | codings | decode ms | forward ms | decode ÷ forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        codings = ", ".join(f"{n} {c}" for c, n in sorted(r.codings.items()))
        lines.append(
            f"| {r.name} | {100 * r.switched_off / r.masked:.2f}% | {r.format_1_bytes:,} | "
            f"{r.format_2_bytes:,} | {r.bits_per_weight:.3f} | "
            f"{r.entropy_bytes + r.head_bytes:,.0f} | {r.over_entropy:.2f} | {codings} | "
            f"{1e3 * r.decode_s:.2f} | {1e3 * r.forward_s:.2f} | {r.decode_over_forward:.3f} |"
        )
    lines += ["", *_unranked_note(rows)]
    lines += [
        "## If masks were denser",
        "",
        f"Format 2 on {backbone.name} with the same fraction switched off in every parameter",
        "and a 10-label head; the last column is what the engine's sparse patch holds per task",
        "as int64 positions (int32 would halve it).",
        "",
        "| switched off | masks bits/weight | + head | ÷ (entropy + head) | coding |"
        " engine patch |",
        "| --- | --- | --- | --- | --- | --- |",
        *density_rows(backbone),
    ]
    return "\n".join(lines) + "\n"


def _unranked_note(rows: list[TaskSize]) -> list[str]:
    """Why a task that switches no weight off is left out of the second figure, if any is."""
    names = [r.name for r in rows if not r.switched_off]
    if not names:
        return []
    return [
        f"A task that switches no weight off ({', '.join(names)}) has zero mask entropy: its",
        "ratio is its fixed metadata (labels, metrics, the masks table) over its head, so it",
        "is listed but not ranked in the second figure.",
        "",
    ]


def main() -> None:
    rows = measure_all()
    text = report(rows, demo.load_demo_backbone())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
