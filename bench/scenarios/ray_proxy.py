"""Ray Serve in front of our app vs our app alone: images per CPU-second of the serving side.

One task over HTTP on loopback, the same load generator and requests for every side:
- direct: `piggy-serve` (uvicorn), the whole machine;
- ray1:   `piggy-serve --ray --replicas 1`, the replica given every CPU;
- ray2:   `piggy-serve --ray --replicas 2`, half the CPUs each.
Sides are measured in turns, repeat by repeat; "serving side" CPU is every process of that
side (for Ray: proxy, replicas, controller, raylet, GCS, agents). Then one ray2 replica is
killed with SIGKILL, and the time until a new replica answers is recorded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.bed import Bed, Options
from bench.fixtures import Config
from bench.scenarios.serving import summary
from bench.stats import Spread, ratios
from tests.ray.ray_support import RayServe, replica_pid

REPLACE_GIVE_UP_S = 300.0
# bench/run.py's first CPU config: the demo backbone, its real weights.
DEFAULT = Config("efficientnet_lite0", None, 224, 8, 16)
QUICK = Config("resnet18", "random", 32, 4, 8)


class RaySide:
    """A RayServe seen as Bed.load expects a server: a port and CPU seconds so far."""

    def __init__(self, serve: RayServe):
        self.serve = serve
        self.port = serve.port

    def cpu_s(self, children: bool = True) -> float:
        self.serve.pids()
        total = 0.0
        for proc in self.serve._seen.values():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total


def _server_env(bed: Bed) -> dict[str, str]:
    """What bench.procs.start_ours gives our server, for the Ray side too."""
    cfg = bed.config
    env = {
        "PIGGY_HOME": str(bed.workdir / "ray-home"),
        "PIGGY_REGISTRY": f"dir:{bed.registry}",
        "PIGGY_BACKBONE": cfg.backbone,
        "PIGGY_MAX_BATCH_SIZE": str(cfg.batch),
        "PIGGY_QUEUE_SIZE": "1024",
        "PIGGY_REGISTRY_RESCAN_S": "30",
        "PIGGY_DEVICE": bed.device,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    if cfg.weights is not None:
        env["PIGGY_BACKBONE_WEIGHTS"] = cfg.weights
    return env


def _start_ray(bed: Bed, replicas: int) -> tuple[RayServe, float]:
    cpus = os.cpu_count() or 1
    log = bed.workdir / f"ray{replicas}.log"
    serve = RayServe(log, _server_env(bed), replicas=replicas, replica_cpus=cpus / replicas)
    try:
        return serve, serve.wait_ready()
    except BaseException:
        serve.stop()
        raise


def _replicas_answering(serve: RayServe, want: int, timeout_s: float = 60) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=serve.url, timeout=10) as client:
        while len(seen) < want and time.monotonic() < deadline:
            seen.add(client.get("/healthz").headers["x-piggy-replica"])
    return seen


def _replacement_s(serve: RayServe) -> float:
    """SIGKILL one replica at rest; seconds until a replica Ray started anew answers."""
    before = _replicas_answering(serve, 2)
    with httpx.Client(base_url=serve.url, timeout=10) as client:
        victim = replica_pid(client.get("/healthz"))
        killed = time.monotonic()
        os.kill(victim, 9)
        while time.monotonic() - killed < REPLACE_GIVE_UP_S:
            with contextlib.suppress(httpx.HTTPError):
                r = client.get("/healthz")
                if r.status_code == 200 and r.headers["x-piggy-replica"] not in before:
                    return time.monotonic() - killed
            time.sleep(0.1)
    raise TimeoutError(f"no new replica within {REPLACE_GIVE_UP_S}s")


def _measure(bed: Bed, sides: dict, repeats: int) -> dict[str, list[dict]]:
    """Each side in turn, the order rotated per repeat."""
    choose = bed.uniform(1)
    names = list(sides)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(summary(bed.load(sides[name], choose, seed=r)))
    return runs


def measure(ctx) -> dict:
    """Every side, then a replica killed; the runs behind the figures."""
    config = QUICK if ctx.options.quick else DEFAULT
    repeats = 1 if ctx.options.quick else max(2, ctx.options.repeats - 1)
    options = Options(repeats=repeats, window_s=ctx.options.window_s, warmup_s=1.5, n_tasks=1)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        bed = Bed(config, options, Path(tmp), ctx.device)
        out: dict = {"config": config.label, "clients": config.clients, "cpus": os.cpu_count()}
        try:
            direct = bed.start_server()
            ray1, out["ray1_startup_s"] = _start_ray(bed, 1)
            try:
                first = _measure(bed, {"direct": direct, "ray1": RaySide(ray1)}, repeats)
            finally:
                ray1.stop()
            ray2, out["ray2_startup_s"] = _start_ray(bed, 2)
            try:
                second = _measure(bed, {"direct": direct, "ray2": RaySide(ray2)}, repeats)
                out["replaced_s"] = _replacement_s(ray2)
            finally:
                ray2.stop()
        finally:
            bed.stop()
    out["runs"] = {
        "direct_a": first["direct"],
        "ray1": first["ray1"],
        "direct_b": second["direct"],
        "ray2": second["ray2"],
    }
    return out


def _per_cpu(runs: list[dict]) -> list[float]:
    return [r["images_per_cpu_s"] or float("nan") for r in runs]


def summarize(fig: dict) -> dict:
    runs = fig["runs"]
    on = f"{fig['config']}, ×{fig['clients']} clients"
    figures = [
        {
            "figure": "Ray proxy ÷ direct, 1 task, HTTP (1 replica), images per CPU-s",
            "on": on,
            "value": ratios(_per_cpu(runs["ray1"]), _per_cpu(runs["direct_a"])),
        },
        {
            "figure": "Ray proxy ÷ direct, 1 task, HTTP (2 replicas), images per CPU-s",
            "on": on,
            "value": ratios(_per_cpu(runs["ray2"]), _per_cpu(runs["direct_b"])),
        },
        {
            "figure": "a killed replica replaced (SIGKILL → a new replica answers), s",
            "on": on,
            "value": fig.get("replaced_s"),
        },
    ]
    sides = [
        [
            name,
            Spread.of([r["images_per_s"] for r in rs]),
            Spread.of(_per_cpu(rs)),
            Spread.of([r["p50_ms"] for r in rs]),
            Spread.of([r["p99_ms"] for r in rs]),
            sum(sum(r["errors"].values()) for r in rs),
        ]
        for name, rs in runs.items()
    ]
    startup = [
        ["ray, 1 replica", fig["ray1_startup_s"]],
        ["ray, 2 replicas", fig["ray2_startup_s"]],
    ]
    return {"figures": figures, "tables": {"sides": sides, "startup": startup}}
