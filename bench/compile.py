"""torch.compile for an engine worker, measured: what it gains per backbone and input size
(one torch thread, batch 1 and 8, the BN-folded module as a worker runs it) and what it
costs at start (the first call at each shape compiles).

    OMP_WAIT_POLICY=PASSIVE python -m bench.compile [--sizes 64 224] [--backbones ...]

Writes bench/results/compile.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.server.engine.layout import Template

RESULTS = Path(__file__).parent / "results" / "compile.md"
WEIGHTS = {"efficientnet_lite0": None, "resnet18": "random"}


def per_call_ms(fn, x: torch.Tensor, seconds: float = 2.0) -> float:
    """Median-free mean over a bounded window, after two warm-up calls."""
    fn(x), fn(x)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds and calls < 2000:
        fn(x)
        calls += 1
    return 1000 * (time.perf_counter() - started) / calls


def measure(name: str, size: int) -> list[dict]:
    torch._dynamo.reset()  # each size compiles afresh, as a worker's first batches do
    module = Template.of(load_backbone(name, WEIGHTS[name])).module
    compiled = torch.compile(module)
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            started = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - started
            eager = per_call_ms(module, x)
            fast = per_call_ms(compiled, x)
            eager_again = per_call_ms(module, x)  # interleaved: eager, compiled, eager
        eager = (eager + eager_again) / 2
        rows.append(dict(backbone=name, size=size, batch=batch, compile_s=compile_s,
                         eager_ms=eager, compiled_ms=fast, gain=eager / fast))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], command: str) -> str:
    lines = [
        "# torch.compile for an engine worker",
        "",
        f"Command: `{command}`; one torch thread, fp32, CPU, the BN-folded channels_last module.",
        "`compile s`: the first call at that shape (what a worker pays at start, per shape),",
        "with inductor's on-disk cache as the machine has it: a cold cache costs more (on the",
        "machine of these figures, 19 s and 24 s for efficientnet_lite0 64 px b1 and b8).",
        "The default stays off: at most 1.1-1.3x on efficientnet_lite0, none or a loss on",
        "resnet18, against tens of seconds per new shape (a batch size or input size).",
        "",
        "| backbone | px | batch | compile s | eager ms | compiled ms | eager ÷ compiled |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['size']} | {r['batch']} | {r['compile_s']:.1f} | "
            f"{r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['gain']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__)
    p.add_argument("--backbones", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    command = "python -m bench.compile " + " ".join(
        ["--backbones", *args.backbones, "--sizes", *map(str, args.sizes)]
    )
    rows = []
    for name in args.backbones:
        for size in args.sizes:
            rows += measure(name, size)
            args.out.write_text(report(rows, command))  # what is measured so far
    print(report(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
