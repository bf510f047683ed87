"""Ray Serve in front of our app vs our app alone: images per CPU-second of the serving side.

    python -m bench.ray_proxy [--backbone efficientnet_lite0 --weights pretrained
        --input-size 224 --batch 8 --clients 16]
        [--repeats 3 --window-s 5] [--quick] [--out bench/results/ray_proxy.md]

One task over HTTP on loopback, the same load generator and requests for every side:
- direct: `piggy-serve` (uvicorn), the whole machine;
- ray1:   `piggy-serve --ray --replicas 1`, the replica given every CPU;
- ray2:   `piggy-serve --ray --replicas 2`, half the CPUs each.
Sides are measured in turns, repeat by repeat; "serving side" CPU is every process of that
side (for Ray: proxy, replicas, controller, raylet, GCS, agents). Then one ray2 replica is
killed with SIGKILL, and the time until a new replica answers is recorded.
figures() runs it all and returns the numbers (the lead's report calls it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ray_proxy.md"
REPLACE_GIVE_UP_S = 300.0
# bench/run.py's first CPU config: the demo backbone, its real weights.
DEFAULT = Config("efficientnet_lite0", None, 224, 8, 16)


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


def figures(
    config: Config | None = None,
    repeats: int = 3,
    window_s: float = 5.0,
    device: str = "cpu",
    workdir: Path | None = None,
) -> dict:
    """Run everything; the figures and the runs behind them."""
    config = config or DEFAULT
    options = Options(repeats=repeats, window_s=window_s, warmup_s=1.5, n_tasks=1, cache_tasks=1)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        bed = Bed(config, options, Path(workdir or tmp), device)
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
    out["ray1_over_direct"] = _ratio(first["ray1"], first["direct"])
    out["ray2_over_direct"] = _ratio(second["ray2"], second["direct"])
    return out


def _per_cpu(runs: list[dict]) -> list[float]:
    return [r["images_per_cpu_s"] or float("nan") for r in runs]


def _ratio(side: list[dict], direct: list[dict]) -> float:
    return ratios(_per_cpu(side), _per_cpu(direct)).median


def render(fig: dict, command: str) -> str:
    runs = fig["runs"]
    lines = [
        "# Ray Serve's proxy in front of our app",
        "",
        f"`{command}` on {platform.machine()}, {fig['cpus']} CPUs (shared), Python "
        f"{platform.python_version()}: {fig['config']}, ×{fig['clients']} clients, one task, "
        "HTTP on loopback. Images per CPU-second of the serving side (all its processes), "
        "median [min–max] over the repeats; ratios per repeat, sides measured in turns.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| Ray proxy ÷ direct, 1 task, HTTP (1 replica) | "
        f"{ratios(_per_cpu(runs['ray1']), _per_cpu(runs['direct_a'])).fmt()} |",
        f"| Ray proxy ÷ direct, 1 task, HTTP (2 replicas) | "
        f"{ratios(_per_cpu(runs['ray2']), _per_cpu(runs['direct_b'])).fmt()} |",
        f"| a killed replica replaced (SIGKILL → a new replica answers) | "
        f"{fig['replaced_s']:.1f} s |",
        f"| start-up to ready: 1 replica / 2 replicas | "
        f"{fig['ray1_startup_s']:.1f} s / {fig['ray2_startup_s']:.1f} s |",
        "",
        "| side | img/s | img per CPU-s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in runs.items():
        errors = sum(sum(r["errors"].values()) for r in rs)
        lines.append(
            f"| {name} | {Spread.of([r['images_per_s'] for r in rs]).fmt(1)} | "
            f"{Spread.of(_per_cpu(rs)).fmt(1)} | {Spread.of([r['p50_ms'] for r in rs]).fmt(0)} | "
            f"{Spread.of([r['p99_ms'] for r in rs]).fmt(0)} | {errors} |"
        )
    lines += [
        "",
        "direct_a and ray1 were measured in turns, then direct_b and ray2. Two replicas on "
        "this CPU-bound machine share the same cores (half each), so no gain is expected "
        "from them here; they show what the second replica and Ray's routing cost. The "
        "replacement time is Ray noticing the dead actor, starting a new one and our app "
        "loading its backbone in it.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=DEFAULT.backbone)
    p.add_argument("--weights", default="pretrained", help="'pretrained' or 'random'")
    p.add_argument("--input-size", type=int, default=DEFAULT.input_size)
    p.add_argument("--batch", type=int, default=DEFAULT.batch)
    p.add_argument("--clients", type=int, default=DEFAULT.clients)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-s", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="one short repeat (a smoke run)")
    p.add_argument("--out", default=str(RESULTS), help="markdown written here ('' for none)")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m bench` (RESULTS.md)
    weights = None if args.weights == "pretrained" else args.weights
    config = Config(args.backbone, weights, args.input_size, args.batch, args.clients)
    repeats, window = (1, 2.0) if args.quick else (args.repeats, args.window_s)
    fig = figures(config, repeats, window)
    text = render(fig, "python -m bench.ray_proxy " + " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
