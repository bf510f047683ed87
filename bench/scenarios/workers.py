"""The engine's worker processes against the limit of the hardware.

- limit: the BN-folded module (channels_last, inference mode, one torch thread) at its best
  batch of 1 or 8, images per CPU second of this process;
- server ÷ limit, 1 task, HTTP: the real server (a subprocess, PIGGY_* settings), 8
  clients posting PNGs; images per CPU second of ALL the server's processes (the parent
  and its engine worker children) ÷ the limit measured in the same run, interleaved;
- CPU outside the engine ÷ engine CPU: the CPU of every server process but the engine
  workers (the server process, front ends under --frontends, multiprocessing's forkserver
  and resource trackers: bench/procs.py's `roles`) ÷ the engine workers', same run;
- engine pool alone (no HTTP), batches of 8, 2 workers ÷ 1 (wall images/s), and the
  alternative: N in-process workers driven by N threads, 2 threads ÷ 1;
- a worker SIGKILLed under load: non-200 answers, the server still answering, /readyz
  showing the worker replaced.
Before each server window and each pool rate it waits (at most 15 s) for the shared machine
to go quiet. Every loop is bounded in count and time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from bench import fixtures, loadgen, procs, timing
from bench.fixtures import Config
from bench.stats import Spread
from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.server.engine import EnginePool, Row, Worker
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.layout import Template
from piggyback_serve.server.settings import Settings

CONFIGS = [
    Config("efficientnet_lite0", None, 64, 8, 8),
    Config("efficientnet_lite0", None, 224, 8, 8),
    Config("resnet18", "random", 64, 8, 8),
    Config("resnet18", "random", 224, 8, 8),
]
QUICK = [Config("resnet18", "random", 32, 8, 8)]
MAX_STEPS = 5000


def pngs(size: int, n: int = 4) -> list[bytes]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        a = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# -- the limit ---------------------------------------------------------------------------


def limit(module, size: int, seconds: float) -> dict:
    """Images per CPU second of the folded module, 1 thread, best of batch 1 and 8."""
    best = {}
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

        def step(x=x):
            with torch.inference_mode():
                module(x)

        best[batch] = timing.rate(step, batch, seconds, threads=1)["images_per_cpu_s"]
    b = max(best, key=best.get)
    return {"images_per_cpu_s": best[b], "batch": b, "by_batch": best}


# -- the server over HTTP -----------------------------------------------------------------


def cpu_split(proc: procs.Proc) -> tuple[float, float, float]:
    """CPU seconds so far outside the engine (the server process, any front ends and
    multiprocessing's helpers), of the engine workers, and of the helpers alone."""
    cpu = proc.cpu_by_role()
    return cpu["main"] + cpu["frontends"] + cpu["helpers"], cpu["engine"], cpu["helpers"]


def start_server(
    workdir: Path, registry: Path, cfg: Config, workers: int | None, device: str = "cpu"
) -> procs.Proc:
    """Our server on `device` with `workers` engine workers (None: the default placement)."""
    workers_env = {} if workers is None else {"PIGGY_ENGINE_WORKERS": str(workers)}
    proc = procs.start_ours(
        workdir,
        registry,
        cfg.backbone,
        cfg.weights,
        cfg.batch,
        tag=f"workers-{cfg.backbone}-{cfg.input_size}-{workers}",
        extra_env={
            "PIGGY_DEVICE": device,
            **workers_env,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        },
    )
    proc.wait_ready("/readyz", 600)
    return proc


def http_side(proc, choose, clients: int, seconds: float, warmup_s: float) -> dict:
    procs.wait_quiet()  # the machine is shared: let other tenants' work pass, within bounds
    loadgen.run(proc.port, choose, clients, 2000, warmup_s, seed=99)
    p0, c0, h0 = cpu_split(proc)
    res = loadgen.run(proc.port, choose, clients, MAX_STEPS, seconds)
    p1, c1, h1 = cpu_split(proc)
    parent, children = p1 - p0, c1 - c0
    return {
        "images": res.images,
        "images_per_s": res.images_per_s,
        "images_per_cpu_s": res.images / (parent + children) if parent + children else None,
        "parent_cpu_s": parent,
        "workers_cpu_s": children,
        "helpers_cpu_s": h1 - h0,  # counted in parent_cpu_s
        "errors": dict(res.errors),
        "p50_ms": res.p(50),
    }


def serving(
    cfg: Config, backbone, workdir: Path, repeats: int, seconds: float, device: str = "cpu"
) -> dict:
    """Limit and server interleaved (limit, server, limit, ...), one task, 8 clients. The
    limit is the plain module on one CPU thread; on a GPU the server's images/s is the
    figure (bench.gpu), with one engine worker per device."""
    registry = workdir / f"reg-{cfg.backbone}-{cfg.input_size}"
    names = fixtures.write_registry(registry, backbone, 1, cfg.input_size)
    module = Template.of(backbone).module
    bodies = pngs(cfg.input_size)
    reqs = [
        loadgen.Request.post(f"/predict?task={names[0]}&top_k=5", b, "image/png") for b in bodies
    ]
    choose = lambda rng: rng.choice(reqs)  # noqa: E731
    workers = (os.cpu_count() or 1) if device == "cpu" else None
    proc = start_server(workdir, registry, cfg, workers, device)
    out: dict = {"limit": [], "server": []}
    try:
        for _ in range(repeats):
            out["limit"].append(limit(module, cfg.input_size, seconds))
            out["server"].append(http_side(proc, choose, cfg.clients, seconds, seconds / 4))
        out["limit"].append(limit(module, cfg.input_size, seconds))
    finally:
        proc.stop()
    return out


# -- the pool alone, and threads -------------------------------------------------------


def _task_rows(backbone, cfg: Config, workdir: Path, prepare) -> list[Row]:
    registry = workdir / f"reg-{cfg.backbone}-{cfg.input_size}"
    names = fixtures.write_registry(registry, backbone, 1, cfg.input_size)
    art = artifacts.load(registry / f"{names[0]}.safetensors", backbone)
    return [Row((names[0], "bench"), prepare(art))] * 8


def pool_rate(backbone, cfg: Config, workdir: Path, workers: int, seconds: float) -> float:
    async def main() -> float:
        pool = EnginePool(
            Settings(backbone=cfg.backbone, device="cpu", engine_workers=workers), backbone
        )
        await pool.start()
        try:
            rows = _task_rows(backbone, cfg, workdir, pool.prepare)
            pixels = torch.randint(0, 256, (8, 3, cfg.input_size, cfg.input_size)).byte()
            await asyncio.gather(*(pool.predict(rows, pixels) for _ in range(workers)))
            started, done = time.perf_counter(), 0
            while done < MAX_STEPS and time.perf_counter() - started < seconds:
                n = 2 * workers
                await asyncio.gather(*(pool.predict(rows, pixels) for _ in range(n)))
                done += n
            return done * 8 / (time.perf_counter() - started)
        finally:
            await pool.close()

    return asyncio.run(main())


def thread_rate(backbone, cfg: Config, workdir: Path, threads: int, seconds: float) -> float:
    torch.set_num_threads(1)  # process-wide: every worker thread runs one torch thread
    config = WorkerConfig(index=0, device="cpu", dtype="float32", threads=1, one_pass=False)
    template = Template.of(backbone)
    workers = [Worker(config, template) for _ in range(threads)]
    rows = _task_rows(backbone, cfg, workdir, workers[0].prepare)
    pixels = torch.randint(0, 256, (8, 3, cfg.input_size, cfg.input_size)).byte()
    deadline = time.perf_counter() + seconds

    def loop(w: Worker) -> int:
        w.step(rows, pixels)
        n = 0
        while n < MAX_STEPS and time.perf_counter() < deadline:
            w.step(rows, pixels)
            n += 1
        return n

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        done = sum(ex.map(loop, workers))
    return done * 8 / (time.perf_counter() - started)


def scaling(backbone, cfg: Config, workdir: Path, repeats: int, seconds: float) -> dict:
    out: dict = {"pool": {1: [], 2: []}, "threads": {1: [], 2: []}}
    threads = torch.get_num_threads()
    try:
        for r in range(repeats):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                procs.wait_quiet()
                out["pool"][n].append(pool_rate(backbone, cfg, workdir, n, seconds))
                out["threads"][n].append(thread_rate(backbone, cfg, workdir, n, seconds))
    finally:
        torch.set_num_threads(threads)
    return out


# -- a worker killed under load ------------------------------------------------------------


def readyz(proc: procs.Proc) -> dict:
    with urllib.request.urlopen(proc.url("/readyz"), timeout=10) as r:
        return json.loads(r.read())


def kill(cfg: Config, backbone, workdir: Path, seconds: float) -> dict:
    registry = workdir / f"reg-{cfg.backbone}-{cfg.input_size}"
    names = fixtures.write_registry(registry, backbone, 1, cfg.input_size)
    reqs = [
        loadgen.Request.post(f"/predict?task={names[0]}&top_k=5", b, "image/png")
        for b in pngs(cfg.input_size)
    ]
    proc = start_server(workdir, registry, cfg, workers=2)
    try:
        before = readyz(proc)["workers"]
        holder: dict = {}

        def load() -> None:
            holder["res"] = loadgen.run(
                proc.port, lambda rng: rng.choice(reqs), cfg.clients, MAX_STEPS, seconds
            )

        t = threading.Thread(target=load)
        t.start()
        time.sleep(seconds / 3)
        victim = before[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        t.join(seconds + 120)
        res = holder["res"]
        after = {}
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            after = readyz(proc)
            if all(w["state"] == "ready" for w in after["workers"]):
                break
            time.sleep(0.2)
        tail = loadgen.run(proc.port, lambda rng: reqs[0], 2, 20, 10)
        return {
            "requests": res.requests,
            "failed": sum(res.errors.values()),
            "errors": dict(res.errors),
            "max_batch": cfg.batch,
            "killed_pid": victim,
            "workers_after": after.get("workers"),
            "restarts": sum(w["restarts"] for w in after.get("workers", [])),
            "answers_after": tail.requests - sum(tail.errors.values()),
        }
    finally:
        proc.stop()


# -- the scenario ----------------------------------------------------------------------


def measure(ctx) -> dict:
    import sys
    import tempfile

    quick = ctx.options.quick
    configs = QUICK if quick else CONFIGS
    repeats, seconds = (1, 1.0) if quick else (ctx.options.repeats, ctx.options.window_s)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="piggy-workers-") as tmp:
        work = Path(tmp)
        for cfg in configs:
            print(f"[workers] {cfg.label}", file=sys.stderr, flush=True)
            backbone = fixtures.backbone_for(cfg)
            bed: dict = {"size": cfg.input_size, "backbone": cfg.backbone}
            bed["serving"] = serving(cfg, backbone, work, repeats, seconds)
            if cfg.input_size != 224:
                bed["scaling"] = scaling(backbone, cfg, work, max(1, repeats - 1), seconds)
                bed["kill"] = kill(cfg, backbone, work, max(3.0, seconds))
            results[cfg.label] = bed
    return results


def _median(xs) -> float:
    xs = [x for x in xs if x]
    return statistics.median(xs) if xs else float("nan")


def figures(bed: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    s = bed.get("serving")
    size = bed.get("size")
    px = "224 px" if size == 224 else "64 px"
    if s:
        lim = [r["images_per_cpu_s"] for r in s["limit"]]
        # each server side against the mean of the limits measured either side of it
        ratios = [
            srv["images_per_cpu_s"] / ((lim[i] + lim[i + 1]) / 2)
            for i, srv in enumerate(s["server"])
            if srv["images_per_cpu_s"]
        ]
        out[f"server ÷ limit, 1 task, HTTP, {px}"] = _median(ratios)
        if size != 224:
            out["CPU outside the engine ÷ engine CPU, per image, 64 px"] = _median(
                r["parent_cpu_s"] / r["workers_cpu_s"] for r in s["server"] if r["workers_cpu_s"]
            )
    sc = bed.get("scaling")
    if sc:
        for key, name in (
            ("pool", "engine pool, b8: 2 workers ÷ 1 worker, images/s (processes)"),
            ("threads", "in-process workers, b8: 2 threads ÷ 1 thread, images/s"),
        ):
            runs = {int(k): v for k, v in sc[key].items()}
            out[name] = _median(a / b for a, b in zip(runs[2], runs[1], strict=True))
    k = bed.get("kill")
    if k:
        out["requests failed when a worker is killed under load"] = k["failed"]
    return out


def summarize(results: dict) -> dict:
    figs, serving_rows, scaling_rows, kill_rows = [], [], [], []
    for label, bed in results.items():
        figs += [{"figure": f, "on": label, "value": v} for f, v in figures(bed).items()]
        s = bed["serving"]
        srv = s["server"]
        serving_rows.append(
            [
                label,
                Spread.of([r["images_per_cpu_s"] for r in s["limit"]]),
                Spread.of([r["images_per_cpu_s"] or float("nan") for r in srv]),
                Spread.of([r["images_per_s"] for r in srv]),
                Spread.of([r["parent_cpu_s"] for r in srv]),
                Spread.of([r["workers_cpu_s"] for r in srv]),
            ]
        )
        for mode, runs in (bed.get("scaling") or {}).items():
            runs = {int(k): v for k, v in runs.items()}
            scaling_rows.append([label, mode, Spread.of(runs[1]), Spread.of(runs[2])])
        k = bed.get("kill")
        if k:
            kill_rows.append([label, k["requests"], k["failed"], k["restarts"], k["answers_after"]])
    tables = {"serving": serving_rows, "scaling": scaling_rows, "kill": kill_rows}
    return {"figures": figs, "tables": tables}
