"""The front end's preprocessing per image: decode + resize to a task's pixels, CPU ms.

Two inputs for a 224 px task: ordinary JPEG photos (scikit-image's, 451x300 to 640x427,
quality 90: only the 512x512 one is at least twice 224 on its shorter side) and a phone's
4032x3024 JPEG (the cat upscaled). Two sides, interleaved in every repeat:
- before: the whole JPEG decoded, then resized (the decode before masks/decode.py, kept
  here as `full_decode`);
- after: `preprocess.prepare`, what the front end runs: masks' `open_image`, which decodes
  a JPEG of at least twice the task's size at the DCT scale that still covers it.
CPU time of this process through torch.utils.benchmark.Timer (bench/timing.py), one thread
(Pillow's JPEG decode and resize use one). On a CUDA device the same photos also go through
`decode_jpegs_on_device` in batches (wall ms per image, synchronised).

Over HTTP (after only: the server runs today's code), the same JPEGs POSTed to a server
with one 224 px task (resnet18, random weights), 4 clients, closed loop: the CPU seconds
of the server's own process (HTTP, decode, batching; its engine workers excluded) per image.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from PIL import Image

from bench import fixtures, loadgen, procs, timing
from bench.stats import Spread, ratios
from piggyback_serve.masks.data import to_pixels, upright
from piggyback_serve.server import preprocess

SIZE = 224
PHONE = (4032, 3024)
MAX_PIXELS = 50_000_000
TASK = SimpleNamespace(input_size=SIZE)  # all that preprocess.prepare reads of an artifact
ROW_PHOTOS = "CPU ms per image, 224 px task, JPEG photos 451x300-640x427 (decode + resize)"
ROW_PHONE = "CPU ms per image, 224 px task, 4032x3024 phone JPEG (decode + resize)"


def full_decode(blob: bytes, size: int) -> torch.Tensor:
    """Before: every pixel of the JPEG decoded, then the shorter side resized to `size`."""
    image = Image.open(io.BytesIO(blob), formats=preprocess.FORMATS)
    image.load()
    return to_pixels(upright(image), size)


def inputs() -> dict[str, list[bytes]]:
    photos = [Image.fromarray(p).convert("RGB") for p in fixtures._photos()]
    return {"photos": [_jpeg(p) for p in photos], "phone": [_jpeg(photos[2].resize(PHONE))]}


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def measure(ctx) -> dict:
    quick = ctx.options.quick
    repeats, seconds = (2, 0.2) if quick else (max(ctx.options.repeats, 5), 1.0)
    blobs = inputs()
    sides = {
        "before": lambda bs: [full_decode(b, SIZE) for b in bs],
        "after": lambda bs: preprocess.prepare(bs, TASK, MAX_PIXELS),
    }
    runs = {case: {side: [] for side in sides} for case in blobs}
    for _ in range(repeats):
        for case, bs in blobs.items():
            for side, fn in sides.items():
                per_call = timing.ms(lambda fn=fn, bs=bs: fn(bs), seconds, threads=1)
                runs[case][side].append(per_call / len(bs))
    out = {
        "size": SIZE,
        "repeats": repeats,
        "inputs": {
            case: [list(Image.open(io.BytesIO(b)).size) for b in bs] for case, bs in blobs.items()
        },
        "cpu_ms": runs,
        "agreement": agreement(blobs),
    }
    if ctx.device.startswith("cuda"):
        out["device"] = on_device(blobs, ctx.device, seconds)
    out["http"] = over_http(ctx, blobs, repeats, 2.0 if quick else 6.0)
    return out


def over_http(ctx, blobs: dict[str, list[bytes]], repeats: int, seconds: float) -> dict:
    """The server process's own CPU ms per image answered, per input, repeats interleaved."""
    from piggyback_serve.masks.backbones import load_backbone

    registry = ctx.workdir / "decode-registry"
    (name,) = fixtures.write_registry(registry, load_backbone("resnet18", "random"), 1, SIZE)
    proc = procs.start_ours(
        ctx.workdir, registry, "resnet18", "random", 8, tag="decode",
        extra_env={"PIGGY_DEVICE": ctx.device},
    )  # fmt: skip
    found: dict = {case: [] for case in blobs}
    try:
        proc.wait_ready("/readyz", 600)
        for _ in range(repeats):
            for case, bs in blobs.items():
                reqs = [loadgen.Request.post(f"/predict?task={name}", b, "image/jpeg") for b in bs]
                choose = lambda rng, reqs=reqs: rng.choice(reqs)  # noqa: E731
                loadgen.run(proc.port, choose, 4, 200, seconds / 4)  # warm
                cpu = proc.cpu_s()
                result = loadgen.run(proc.port, choose, 4, 100_000, seconds).check()
                found[case].append(
                    {
                        "ms": 1e3 * (proc.cpu_s() - cpu) / max(result.images, 1),
                        "images": result.images,
                        "errors": sum(result.errors.values()),
                    }
                )
    finally:
        proc.stop()
    return found


def agreement(blobs: dict[str, list[bytes]]) -> dict:
    """How far after's pixels are from before's (mean and max absolute difference, of 255)."""
    found = {}
    for case, bs in blobs.items():
        diffs = [
            (full_decode(b, SIZE).float() - preprocess.prepare([b], TASK, MAX_PIXELS)[0]).abs()
            for b in bs
        ]
        found[case] = {
            "mean_abs": max(d.mean().item() for d in diffs),
            "max_abs": max(d.max().item() for d in diffs),
        }
    return found


def on_device(blobs: dict[str, list[bytes]], device: str, seconds: float) -> dict:
    """`decode_jpegs_on_device` on batches of 32, wall ms per image (CUDA synchronised)."""
    from piggyback_serve.masks.decode import decode_jpegs_on_device

    found = {}
    for case, bs in blobs.items():
        batch = [bs[i % len(bs)] for i in range(32)]
        ms = timing.ms(lambda b=batch: decode_jpegs_on_device(b, SIZE, device), seconds)
        found[case] = ms / len(batch)
    return found


def summarize(raw: dict) -> dict:
    rows, figures = [], []
    named = {"photos": ROW_PHOTOS, "phone": ROW_PHONE}
    for case, sides in raw["cpu_ms"].items():
        before, after = sides["before"], sides["after"]
        figures.append({"figure": named[case], "on": "after", "value": Spread.of(after)})
        sizes = ", ".join(f"{w}x{h}" for w, h in raw["inputs"][case])
        rows.append(
            [
                case,
                sizes,
                Spread.of(before),
                Spread.of(after),
                ratios(before, after),
                raw["agreement"][case]["mean_abs"],
                raw["agreement"][case]["max_abs"],
                (raw.get("device") or {}).get(case),
            ]
        )
    http = [
        [
            case,
            Spread.of([r["ms"] for r in runs]),
            sum(r["images"] for r in runs),
            sum(r["errors"] for r in runs),
        ]
        for case, runs in (raw.get("http") or {}).items()
    ]
    return {"figures": figures, "tables": {"cpu": rows, "http": http}}
