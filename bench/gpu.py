"""`python -m bench.gpu`: the engine's in-process figures on CUDA, at larger batches, and
the HTTP path: our server with one engine worker per device, one task, 8 clients.

Task switch ÷ batch-1 forward, engine ÷ plain module (one task), and mixed batches
(1, 2, 4, 8 tasks) run per task and in one pass (the way chosen per layer, forced to
corrections, forced to segments), with time per layer kind: which of per-task and
one-pass wins on the card is what `PIGGY_MIXED_BATCHES=auto` should pick there.
Bounded: well under 10 minutes on one GPU.
`--device cpu --quick` runs the same code paths in seconds (tests/bench does).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench import fixtures, multitask, workers
from bench.fixtures import Config


def configs(quick: bool, batch: int) -> list[Config]:
    if quick:
        return [Config("resnet18", "random", 32, 4, 4)]
    return [
        Config("efficientnet_lite0", None, 64, batch, batch),
        Config("resnet18", "random", 64, batch, batch),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="resnet18 32 px, b4, tiny windows")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--out", type=Path, help="where gpu.json and GPU.md go")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: CUDA is not available here (use --device cpu --quick)", file=sys.stderr)
        return 2
    repeats, window = (1, 0.2) if args.quick else (args.repeats, args.window_s)
    results: dict = {"beds": {}, "device": str(device)}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory(prefix="piggy-gpu-") as tmp:
        for cfg in configs(args.quick, args.batch):
            print(f"[bench.gpu] {cfg.label} on {device}", file=sys.stderr, flush=True)
            backbone = fixtures.backbone_for(cfg)
            b = multitask.Bench(cfg, backbone, Path(tmp) / cfg.backbone, 8, str(device))
            try:
                ip = multitask.in_process(b, repeats, window, batch=cfg.batch)
            finally:
                b.close()
            http = workers.serving(cfg, backbone, Path(tmp), repeats, window, str(device))
            results["beds"][f"{cfg.label} {device.type}"] = {"in_process": ip, "http_workers": http}
    command = "python -m bench.gpu " + " ".join(argv or sys.argv[1:])
    multitask.publish(results, command, args.out, "gpu.json", "GPU.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
