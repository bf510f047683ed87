"""Per-family figures: the engine on backbones of other families, at their native size.

For each backbone (`timm:<model>` / `torchvision:<model>`, random-init weights, fp32, the
CPU, one torch thread), with synthetic tasks (~1% of the mask bits off):
- engine ÷ plain module, one task, in process: images per CPU second of an engine worker
  (per task, as the CPU server runs) stepping one task vs the plain module (a copy of the
  backbone in channels_last, eval, inference mode), batch 8 and batch 1, the sides
  interleaved over repeats; the median of the per-repeat ratios;
- task switch ÷ batch-1 forward: a working-copy switch between two tasks vs a batch-1
  forward of the plain module (CPU seconds, interleaved);
- bytes per task: the artifact file (format 2), its bits per masked weight (8 x bytes /
  maskable weights), and the task state the engine keeps (`TaskState.nbytes`).
The measuring code is bench/scenarios/multitask.py's (`Bench`, `rate`, `engine_vs_plain`,
`switch_figure`). A family that fails is reported, not fatal.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.fixtures import Config, backbone_for
from bench.scenarios import multitask
from bench.stats import Spread, ratios

FAMILIES = (
    "timm:resnet10t",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_small_050",
    "timm:regnetx_002",
    "timm:convnext_atto",
    "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_patch16_224",
    "torchvision:regnet_x_400mf",
)
QUICK = ("timm:resnet10t", "timm:mobilenetv3_small_050")
QUICK_SIZE = 64  # --quick: this input size where the family takes it (ViTs: their own)
BATCHES = (8, 1)
COLUMNS = (
    "family",
    "input px",
    "maskable weights",
    "engine ÷ plain b8",
    "engine ÷ plain b1",
    "switch ÷ b1 forward",
    "artifact bytes",
    "bits/weight",
    "task state bytes",
)


def log(msg: str) -> None:
    print(f"[families {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def takes(module: torch.nn.Module, size: int) -> bool:
    """Whether `module` runs on `size` px inputs (a ViT's patch embedding fixes its size)."""
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, size, size))
    except Exception:  # noqa: BLE001 - any refusal means: not at this size
        return False
    return True


def measure_family(family: str, repeats: int, seconds: float, work: Path, size: int | None) -> dict:
    """One family's raw figures; `size` None: its native input size."""
    backbone = backbone_for(Config(family, "random", 0, 8, 8))
    native = backbone.input_size
    if size is None or not takes(backbone.module, size):
        size = native
    cfg = Config(family, "random", size, max(BATCHES), 8)
    maskable = sum(w.numel() for w in backbone.maskable().values())
    b = multitask.Bench(cfg, backbone, work / family.replace(":", "-"), 2, "cpu")
    try:
        # The state the CPU server keeps (per task: no one-pass tables), and the one-pass
        # state `Bench` prepares for both of its workers.
        state = b.worker.prepare(b.arts[0])
        switched_off = int(state.counts.sum())
        out = {
            "family": family,
            "native_size": native,
            "input_size": size,
            "maskable_weights": maskable,
            "masked_layers": len(backbone.maskable()),
            "switched_off": switched_off,
            "num_features": backbone.num_features,
            "artifact_bytes": b.artifact_bytes,
            "head_bytes": 4 * (b.arts[0].head_weight.numel() + b.arts[0].head_bias.numel()),
            "task_state_bytes": state.nbytes,
            "task_state_bytes_one_pass": b.states[0].nbytes,
            "switch": multitask.switch_figure(b, repeats),
            "engine_vs_plain": {
                str(n): multitask.engine_vs_plain(b, n, repeats, seconds) for n in BATCHES
            },
        }
    finally:
        b.close()
    return out


def run(
    families: list[str] | tuple[str, ...] = FAMILIES,
    repeats: int = 3,
    window_s: float = 1.5,
    size: int | None = None,
) -> dict:
    """Every family's figures, one torch thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results: dict = {"beds": {}, "failed": []}
    try:
        with tempfile.TemporaryDirectory(prefix="piggy-families-") as tmp:
            for family in families:
                log(family)
                t0 = time.perf_counter()
                try:
                    bed = measure_family(family, repeats, window_s, Path(tmp), size)
                except Exception as exc:  # noqa: BLE001 - one family must not sink the rest
                    results["failed"].append(f"{family}: {type(exc).__name__}: {exc}")
                    log(f"{family} failed: {type(exc).__name__}: {exc}")
                    continue
                bed["seconds"] = round(time.perf_counter() - t0, 1)
                results["beds"][family] = bed
    finally:
        torch.set_num_threads(threads)
    return results


def measure(ctx) -> dict:
    if ctx.options.quick:
        return run(QUICK, repeats=1, window_s=0.3, size=QUICK_SIZE)
    return run(FAMILIES)


def figures(bed: dict) -> dict[str, float]:
    """The table's numbers for one family (ratios: medians of per-repeat ratios)."""
    out = {
        "input px": bed["input_size"],
        "maskable weights": bed["maskable_weights"],
    }
    for n, runs in bed["engine_vs_plain"].items():
        engine, plain = multitask.rates(runs["engine"]), multitask.rates(runs["plain"])
        out[f"engine ÷ plain b{n}"] = ratios(engine, plain)
    s = bed["switch"]
    out["switch ÷ b1 forward"] = ratios(s["switch_ms"], s["forward_b1_ms"])
    out["artifact bytes"] = bed["artifact_bytes"]
    out["bits/weight"] = 8 * bed["artifact_bytes"] / bed["maskable_weights"]
    out["task state bytes"] = bed["task_state_bytes"]
    return out


def summarize(results: dict) -> dict:
    table, behind = [], []
    for family, bed in results["beds"].items():
        f = figures(bed)
        table.append([family, *(f.get(c) for c in COLUMNS[1:])])
        e, s = bed["engine_vs_plain"], bed["switch"]
        cells = [
            Spread.of(multitask.rates(e[n][side])) if n in e else None
            for n in ("8", "1")
            for side in ("plain", "engine")
        ]
        behind.append(
            [
                family,
                *cells,
                Spread.of(s["switch_ms"]),
                Spread.of(s["forward_b1_ms"]),
                bed["switched_off"],
                bed["task_state_bytes_one_pass"],
                bed["head_bytes"],
            ]
        )
    failed = [f.split(": ", 1) for f in results.get("failed", [])]
    return {"tables": {"families": table, "rates": behind, "failed": failed}}
