"""How the demo tasks' masks code: Elias–Fano (format 2's choice) against gap codings.

zstd rows need the zstandard package (not a dependency).

Per task: total bytes of all masks and the time to decode them to positions (median of
repeats, one thread), for Elias–Fano, varint gaps, varint gaps + zstd -19, and the bitmap,
next to the masks' entropy. Why format 2 uses Elias–Fano (src/piggyback_serve/masks/codec.py).
"""

from __future__ import annotations

import numpy as np

from bench import timing
from bench.scenarios.artifact import binary_entropy_bytes
from piggyback_serve.masks import artifact, codec, demo


def varint_gaps(off: np.ndarray) -> bytes:
    out = bytearray()
    for gap in (np.diff(off, prepend=-1) - 1).tolist():
        while gap >= 0x80:
            out.append((gap & 0x7F) | 0x80)
            gap >>= 7
        out.append(gap)
    return bytes(out)


def varint_decode(raw: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    shift = 7 * (np.arange(b.size) - np.repeat(starts, ends - starts + 1))
    gaps = np.add.reduceat((b & 0x7F).astype(np.int64) << shift, starts)
    return np.cumsum(gaps + 1) - 1


def _median_s(fn) -> float:
    return timing.ms(fn, 0.2, threads=1) / 1e3


def codings(task, backbone, zstd) -> dict[str, tuple[int, float]]:
    """coding -> (bytes, decode seconds) over all of a task's masks."""
    offs = {n: task.switched_off(n, w.numel()).numpy() for n, w in backbone.maskable().items()}
    offs = {n: (o, backbone.maskable()[n].numel()) for n, o in offs.items() if o.size}
    ef = {n: codec.encode(codec.ELIAS_FANO, o, u) for n, (o, u) in offs.items()}
    bm = {n: codec.encode(codec.BITMAP, o, u) for n, (o, u) in offs.items()}
    vg = {n: varint_gaps(o) for n, (o, _) in offs.items()}
    rows = {
        "elias-fano": (
            sum(s.size for s in ef.values()),
            lambda: [
                codec.decode(codec.ELIAS_FANO, ef[n], o.size, u) for n, (o, u) in offs.items()
            ],
        ),
        "bitmap": (
            sum(s.size for s in bm.values()),
            lambda: [codec.decode(codec.BITMAP, bm[n], o.size, u) for n, (o, u) in offs.items()],
        ),
        "varint gaps": (
            sum(map(len, vg.values())),
            lambda: [varint_decode(vg[n], o.size) for n, (o, _) in offs.items()],
        ),
    }
    if zstd is not None:
        vz = {n: zstd.ZstdCompressor(level=19).compress(v) for n, v in vg.items()}
        d = zstd.ZstdDecompressor()
        rows["varint gaps + zstd -19"] = (
            sum(map(len, vz.values())),
            lambda: [
                varint_decode(d.decompress(vz[n], max_output_size=10 * o.size), o.size)
                for n, (o, _) in offs.items()
            ],
        )
    return {name: (size, _median_s(fn)) for name, (size, fn) in rows.items()}


def measure(ctx) -> dict:
    try:
        import zstandard as zstd
    except ImportError:
        zstd = None
    backbone = demo.load_demo_backbone()
    rows = []
    for path in sorted(demo.BUNDLED_DIR.glob("*.safetensors")):
        task = artifact.load(path, backbone)
        entropy = sum(
            binary_entropy_bytes(task.switched_off(n, w.numel()).numel(), w.numel())
            for n, w in backbone.maskable().items()
        )
        if not entropy:
            continue
        for name, (size, seconds) in codings(task, backbone, zstd).items():
            rows.append([path.stem, entropy, name, size, size / entropy, 1e3 * seconds])
    return {"rows": rows}


def summarize(raw: dict) -> dict:
    return {"tables": {"codings": raw["rows"]}}
