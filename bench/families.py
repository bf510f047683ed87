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
The measuring code is bench/multitask.py's (`Bench`, `rate`, `engine_vs_plain`,
`switch_figure`). A family that fails is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import multitask
from bench.fixtures import Config, backbone_for
from bench.stats import Spread, ratios
from piggyback_serve.masks.backbones import resolve

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


def measure(family: str, repeats: int, seconds: float, work: Path, size: int | None) -> dict:
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
                    bed = measure(family, repeats, window_s, Path(tmp), size)
                except Exception as exc:  # noqa: BLE001 - one family must not sink the rest
                    results["failed"].append(f"{family}: {type(exc).__name__}: {exc}")
                    log(f"{family} failed: {type(exc).__name__}: {exc}")
                    continue
                bed["seconds"] = round(time.perf_counter() - t0, 1)
                results["beds"][family] = bed
    finally:
        torch.set_num_threads(threads)
    return results


def quick_run() -> dict:
    """What `--quick` measures: two small families at 64 px, tiny windows (seconds)."""
    return run(QUICK, repeats=1, window_s=0.3, size=QUICK_SIZE)


# ---------------------------------------------------------------------------------------
# Figures and the report


def figures(bed: dict) -> dict[str, float]:
    """The table's numbers for one family (ratios: medians of per-repeat ratios)."""
    out = {
        "input px": bed["input_size"],
        "maskable weights": bed["maskable_weights"],
    }
    for n, runs in bed["engine_vs_plain"].items():
        engine, plain = multitask.rates(runs["engine"]), multitask.rates(runs["plain"])
        out[f"engine ÷ plain b{n}"] = ratios(engine, plain).median
    s = bed["switch"]
    out["switch ÷ b1 forward"] = ratios(s["switch_ms"], s["forward_b1_ms"]).median
    out["artifact bytes"] = bed["artifact_bytes"]
    out["bits/weight"] = 8 * bed["artifact_bytes"] / bed["maskable_weights"]
    out["task state bytes"] = bed["task_state_bytes"]
    return out


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in ("input px", "maskable weights", "artifact bytes", "task state bytes"):
        return f"{int(value):,}"
    return f"{value:.3f}"


def tables(results: dict) -> list[str]:
    """The per-family table, then the raw rates behind its ratios."""
    beds = results.get("beds", {})
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    for family, bed in beds.items():
        f = figures(bed)
        lines.append(f"| {family} | " + " | ".join(_cell(c, f.get(c)) for c in COLUMNS[1:]) + " |")
    lines += [
        "",
        "Behind the ratios, median [min–max] over the repeats: images per CPU second of the "
        "plain module and of the engine, batch 8 and 1; a switch and a batch-1 forward in "
        "CPU ms; the switched-off weights of the task; the task state with the one-pass "
        "tables (what a GPU worker keeps) and the head's share of the artifact.",
        "",
        "| family | plain b8 | engine b8 | plain b1 | engine b1 | switch ms | b1 forward ms "
        "| switched off | state, one-pass | head bytes |",
        "|---|" + "---:|" * 9,
    ]
    for family, bed in beds.items():
        e = bed["engine_vs_plain"]
        cells = []
        for n in ("8", "1"):
            for side in ("plain", "engine"):
                cells.append(Spread.of(multitask.rates(e[n][side])).fmt(1) if n in e else "")
        s = bed["switch"]
        cells += [Spread.of(s["switch_ms"]).fmt(2), Spread.of(s["forward_b1_ms"]).fmt(1)]
        cells += [
            f"{bed['switched_off']:,} ({100 * bed['switched_off'] / bed['maskable_weights']:.2f}%)",
            f"{bed['task_state_bytes_one_pass']:,}",
            f"{bed['head_bytes']:,}",
        ]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    for failure in results.get("failed", []):
        lines.append(f"\n- not measured: {failure}")
    return lines


def meta(command: str, started: float) -> dict:
    """The command line and a note on the machine, for the top of families.md."""
    import psutil

    try:
        import timm

        timm_version = f", timm {timm.__version__}"
    except ImportError:
        timm_version = ""
    try:
        load = "load average {:.1f} {:.1f} {:.1f} (1/5/15 min) at the end".format(*os.getloadavg())
    except OSError:
        load = "load average n/a"
    return {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}{timm_version}",
        "env": f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started),
        "load": load,
    }


def markdown(results: dict) -> str:
    m = results["meta"]
    beds = results.get("beds", {}).values()
    sizes = "at each family's native input size (what timm or torchvision configures for it)"
    if any(b["input_size"] != b["native_size"] for b in beds):
        sizes = (
            "at the input size in the table (native: "
            + ", ".join(f"{b['family']} {b['native_size']} px" for b in beds)
            + ")"
        )
    head = [
        "# Backbone families: engine overhead, task switch and bytes per task",
        "",
        f"Command: `{m['command']}`",
        "",
        f"Run {m['date']} on {m['machine']}; {m['software']}; {m['env']}; "
        f"{m['duration_s']} s, {m['load']}. Random-init weights, fp32, the CPU, one torch "
        f"thread, {sizes}. One synthetic task per family, ~1% of its mask bits "
        "switched off at random, 10 labels. Engine: a worker stepping one task, per task "
        "(as the CPU server runs it), vs the plain module in channels_last; rates are "
        "images per CPU second of this process (the host is shared, so wall time mostly "
        "measures the other tenants), sides interleaved, ratios the median of the "
        "per-repeat ratios. Bits/weight: 8 × artifact bytes ÷ maskable weights (the "
        "float32 head included). Task state: what the CPU engine keeps per task.",
        "",
    ]
    return "\n".join(head + tables(results)) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__)
    p.add_argument(
        "--families",
        nargs="+",
        help="backbones, library:model or an alias (default: the eight in FAMILIES; "
        "commas work too)",
    )
    p.add_argument("--repeats", type=int, help="interleaved repeats per figure (default 3)")
    p.add_argument("--window-s", type=float, help="seconds per rate measurement (default 1.5)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{', '.join(QUICK)} at {QUICK_SIZE} px, 1 repeat, 0.3 s windows (seconds)",
    )
    p.add_argument("--out", type=Path, help="folder for families.md and families.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    families = [f for arg in args.families or [] for f in arg.split(",") if f]
    if args.quick:
        families = families or list(QUICK)
        repeats, window, size = 1, 0.3, QUICK_SIZE
    else:
        families = families or list(FAMILIES)
        repeats, window, size = 3, 1.5, None
    for family in families:
        resolve(family)  # an unknown name fails here, before anything is measured
    results = run(
        families,
        args.repeats if args.repeats is not None else repeats,
        args.window_s if args.window_s is not None else window,
        size,
    )
    command = "python -m bench.families " + shlex.join(argv if argv is not None else sys.argv[1:])
    results["meta"] = meta(command.strip(), started)
    print(write(results, args.out))
    return 0 if results["beds"] else 1


def write(results: dict, out: Path | None) -> str:
    """families.md's text; with `out`, it and families.json written there."""
    text = markdown(results)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "families.json").write_text(json.dumps(results, indent=1, default=float))
        (out / "families.md").write_text(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
