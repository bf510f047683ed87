"""Our server on a CUDA device against the plain model on the same GPU, and the engine's
in-process figures there.

Over HTTP (the figure): efficientnet_lite0 (real weights) and resnet50 (random weights) at
224 px. The plain model is the backbone module alone, eager, fp16, channels_last, inputs
already on the GPU, at its best batch of PLAIN_BATCHES (images/s, synchronised). The
server is piggy-serve as deployed there: default front ends (PIGGY_FRONTENDS unset),
PIGGY_DEVICE=cuda, PIGGY_DTYPE=float16, PIGGY_DECODE default, max batch the plain model's
best batch, a registry of 100 synthetic tasks. JPEG photos (451x300 to 640x427) go over
HTTP, IMAGES_PER_REQUEST per multipart request, from LOADERS load-generator processes of
CLIENTS connections each in a closed loop, to one task ("1 task") or to a task drawn
uniformly per request ("100 tasks"). Per repeat: the plain model, then one window of each;
the figure is each window's images/s ÷ the plain model's of the same repeat.

In process (the engine, fp32, 8 tasks, batch 64; bench/scenarios/multitask.py): task switch
÷ batch-1 forward, engine ÷ plain module (one task), and mixed batches run per task and in
one pass (the way chosen per layer, forced to corrections, forced to segments): which wins
on the card is what `PIGGY_MIXED_BATCHES=auto` should pick there.

Bounded: about 3 minutes a backbone on one H100 (`python -m bench.gpu`, which writes under
$OUT when it is set). On the CPU with --quick it runs the same code paths on a tiny model in
a minute or so (tests/bench does).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from bench import fixtures, loadgen, procs, timing
from bench.fixtures import Config
from bench.scenarios import multitask
from bench.stats import Spread, ratios

IN_PROCESS_BATCH = 64
PLAIN_BATCHES = (32, 64, 128, 256)
TASKS = 100
LOADERS = 4  # load-generator processes: one asyncio loop cannot feed the GPU alone
CLIENTS = 32  # connections per load generator
IMAGES_PER_REQUEST = 8
MAX_REQUESTS = 200_000  # per load generator and window, whatever its length
FIGURE = (
    "images/s from JPEG photos over HTTP ÷ the plain model's on the same GPU "
    "(eager, fp16, best batch), 224 px"
)


def configs(quick: bool) -> list[Config]:
    if quick:
        return [Config("resnet18", "random", 32, 4, 4)]
    return [
        Config("efficientnet_lite0", None, 224, IN_PROCESS_BATCH, CLIENTS),
        Config("resnet50", "random", 224, IN_PROCESS_BATCH, CLIENTS),
    ]


def _log(msg: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the plain model -----------------------------------------------------------------------


class Plain:
    """The backbone module alone, eager, in `dtype`, channels_last, on `device`."""

    def __init__(self, backbone, size: int, device: str, dtype: torch.dtype):
        self.module = copy.deepcopy(backbone.module).to(device, dtype)
        self.module.to(memory_format=torch.channels_last).eval()
        self.size, self.device, self.dtype = size, device, dtype

    def rate(self, batch: int, seconds: float) -> float:
        x = torch.randn(batch, 3, self.size, self.size, device=self.device, dtype=self.dtype)
        x = x.contiguous(memory_format=torch.channels_last)

        def step():
            with torch.inference_mode():
                self.module(x)

        return timing.rate(step, batch, seconds)["images_per_s"]

    def best(self, batches, seconds: float) -> dict:
        by_batch = {b: self.rate(b, seconds) for b in batches}
        return {"batch": max(by_batch, key=by_batch.get), "by_batch": by_batch}

    def close(self) -> None:
        del self.module
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the server over HTTP ------------------------------------------------------------------


def multipart(bodies: list[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body with one `file` field per image, and its content type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + body
        + b"\r\n"
        for i, body in enumerate(bodies)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def requests_for(names: list[str], per_request: int) -> list[loadgen.Request]:
    """One request per task, `per_request` of the JPEG photos each (rotated per task)."""
    photos = fixtures.photo_jpegs()
    out = []
    for t, name in enumerate(names):
        body, ctype = multipart([photos[(t + i) % len(photos)] for i in range(per_request)])
        out.append(loadgen.Request.post(f"/predict?task={name}", body, ctype, images=per_request))
    return out


_REQUESTS: dict[tuple, list[loadgen.Request]] = {}  # a load generator's, built once


def _load(port: int, names: tuple, per_request: int, clients: int, seconds: float, at: float):
    """One load generator (a process of its own): from wall time `at`, a closed loop of
    `clients` connections over one request per task in `names`."""
    key = (names, per_request)
    if key not in _REQUESTS:
        _REQUESTS[key] = requests_for(list(names), per_request)
    reqs = _REQUESTS[key]
    time.sleep(max(0.0, at - time.time()))
    res = loadgen.run(
        port, lambda rng: rng.choice(reqs), clients, MAX_REQUESTS, seconds, seed=int(at)
    )
    return {
        "images": res.images,
        "elapsed_s": res.elapsed_s,
        "latencies_s": res.latencies_s[::10],  # a sample: the p50 needs no more
        "errors": res.errors,
    }


def window(pool, port: int, names: list[str], per_request: int, loaders: int, clients: int,
           seconds: float, lead_s: float = 1.0) -> dict:  # fmt: skip
    """Every load generator at once for `seconds`: images/s of them all together."""
    at = time.time() + lead_s
    futures = [
        pool.submit(_load, port, tuple(names), per_request, clients, seconds, at)
        for _ in range(loaders)
    ]
    found = [f.result(timeout=lead_s + seconds + 180) for f in futures]
    elapsed = max(r["elapsed_s"] for r in found)
    images = sum(r["images"] for r in found)
    errors: dict[str, int] = {}
    for r in found:
        for key, n in r["errors"].items():
            errors[key] = errors.get(key, 0) + n
    latencies = [x for r in found for x in r["latencies_s"]]
    return {
        "images": images,
        "elapsed_s": elapsed,
        "images_per_s": images / elapsed if elapsed else 0.0,
        "errors": errors,
        "p50_ms": loadgen.LoadResult(latencies_s=latencies).p(50),
    }


def http_vs_plain(cfg: Config, backbone, workdir: Path, device: str, o) -> dict:
    """The plain model (fp16, best batch) and the server's windows, 1 and TASKS tasks."""
    quick = o.quick
    repeats, seconds = (1, 1.0) if quick else (o.repeats, max(5.0, o.window_s))
    loaders, clients = (2, 2) if quick else (LOADERS, CLIENTS)
    per_request = 2 if quick else IMAGES_PER_REQUEST
    n_tasks = 3 if quick else TASKS
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    plain = Plain(backbone, cfg.input_size, device, dtype)
    try:
        found = plain.best((8,) if quick else PLAIN_BATCHES, 0.5 if quick else 2.0)
        batch = found["batch"]
        _log(f"{cfg.label}: plain best batch {batch}: {found['by_batch']}")
        registry = workdir / f"gpu-reg-{cfg.backbone}"
        names = fixtures.write_registry(registry, backbone, n_tasks, cfg.input_size)
        sides = {"one": names[:1], "many": names}
        proc = procs.start_ours(
            workdir,
            registry,
            cfg.backbone,
            cfg.weights,
            batch,
            tag=f"gpu-{cfg.backbone}",
            extra_env={
                "PIGGY_DEVICE": device,
                "PIGGY_DTYPE": "float16" if dtype == torch.float16 else "float32",
                "PIGGY_QUEUE_SIZE": "8192",
            },
        )
        out: dict = {
            "plain": found,
            "plain_runs": [],
            "one": [],
            "many": [],
            "tasks": n_tasks,
            "loaders": loaders,
            "clients": clients,
            "images_per_request": per_request,
        }
        ctx = get_context("spawn")  # the load generators touch no CUDA; spawn is safe anyway
        with ProcessPoolExecutor(loaders, mp_context=ctx) as pool:
            try:
                out["ready_s"] = proc.wait_ready("/readyz", 600)
                for tasks in sides.values():  # spawns the load generators, builds requests
                    warm = window(pool, proc.port, tasks, per_request, loaders, clients, 1.0, 10)
                _log(f"{cfg.label}: server up, warm-up {warm['images_per_s']:.0f} images/s")
                for r in range(repeats):
                    out["plain_runs"].append(plain.rate(batch, seconds / 2))
                    for key in ("one", "many") if r % 2 == 0 else ("many", "one"):
                        out[key].append(
                            window(pool, proc.port, sides[key], per_request, loaders, clients,
                                   seconds)
                        )  # fmt: skip
                    _log(
                        f"{cfg.label}: plain {out['plain_runs'][-1]:.0f}, 1 task "
                        f"{out['one'][-1]['images_per_s']:.0f}, {n_tasks} tasks "
                        f"{out['many'][-1]['images_per_s']:.0f} images/s"
                    )
                out["frontends"] = sum(1 for role, _ in _roles(proc) if role == "frontends")
            finally:
                proc.stop()
        return out
    finally:
        plain.close()


def _roles(proc: procs.Proc):
    import psutil

    return procs.roles(psutil.Process(proc.popen.pid))


# -- the scenario --------------------------------------------------------------------------


def in_process(cfg: Config, backbone, folder: Path, device: str, repeats: int, window_s: float):
    b = multitask.Bench(cfg, backbone, folder, 8, device)
    try:
        return multitask.in_process(b, repeats, window_s, batch=cfg.batch)
    finally:
        b.close()
        del b
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(ctx) -> dict:
    o = ctx.options
    repeats, window_s = (1, 0.2) if o.quick else (o.repeats, o.window_s)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="piggy-gpu-") as tmp:
        for cfg in configs(o.quick):
            _log(f"{cfg.label} ...")
            backbone = fixtures.backbone_for(cfg)
            folder = Path(tmp) / cfg.backbone
            bed = {"in_process": in_process(cfg, backbone, folder, ctx.device, repeats, window_s)}
            bed["http"] = http_vs_plain(cfg, backbone, Path(tmp), ctx.device, o)
            results[cfg.label] = bed
    return results


def summarize(results: dict) -> dict:
    figs, mixed, http = [], [], []
    for label, bed in results.items():
        found = multitask.figures({"in_process": bed["in_process"]})
        figs += [{"figure": f, "on": label, "value": v} for f, v in found.items()]
        mixed += multitask.mixed_rows(label, bed["in_process"]["mixed"])[0]
        h = bed.get("http")
        if not h:
            continue
        backbone = label.split()[0]
        for key, tasks in (("one", 1), ("many", h["tasks"])):
            rates = [w["images_per_s"] for w in h[key]]
            on = f"{backbone}, {tasks} task{'s' if tasks > 1 else ''}"
            figs.append({"figure": FIGURE, "on": on, "value": ratios(rates, h["plain_runs"])})
            http.append(
                [
                    backbone,
                    tasks,
                    h.get("frontends"),
                    h["plain"]["batch"],
                    Spread.of(h["plain_runs"]),
                    Spread.of(rates),
                    ratios(rates, h["plain_runs"]),
                    Spread.of([w["p50_ms"] for w in h[key]]),
                    sum(w["images"] for w in h[key]),
                    sum(sum(w["errors"].values()) for w in h[key]),
                ]
            )
    return {"figures": figs, "tables": {"mixed": mixed, "http": http}}
