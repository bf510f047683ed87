"""Does Ray's routing by task (serve.multiplexed) help with many tasks? (issue 14, part 5)

    python -m bench.ray_routing [--tasks 50 --cache-tasks 25 --repeats 3 --window-s 8]

Two `piggy-serve --ray --replicas 2` side by side, the same 50 tasks chosen uniformly at
random, each replica's weight cache holding `--cache-tasks` of them: `plain` lets Ray pick
any replica; `routed` runs with `--route-by-task` (each replica reports the tasks it
served to Ray; Ray's proxy names each request's task, clients send nothing more).
Measured in turns, images per second and per CPU-second of each side.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from bench import loadgen
from bench.bed import Bed, Options
from bench.fixtures import Config
from bench.ray_proxy import RaySide, _server_env
from bench.scenarios.serving import summary
from bench.stats import Spread, ratios

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ray"))
from ray_support import RayServe  # noqa: E402

CONFIG = Config("resnet18", "random", 64, 16, 32)


def _chooser(bed: Bed, n_tasks: int):
    requests = [
        [
            loadgen.Request.post(f"/predict?task={name}&top_k=5", image, "image/jpeg", tag=name)
            for image in bed.images
        ]
        for name in bed.names[:n_tasks]
    ]
    return lambda rng: rng.choice(requests[rng.randrange(n_tasks)])


def run(n_tasks: int, cache_tasks: int, repeats: int, window_s: float) -> dict:
    options = Options(
        repeats=repeats, window_s=window_s, warmup_s=3, n_tasks=n_tasks, cache_tasks=cache_tasks
    )
    with tempfile.TemporaryDirectory(prefix="bench-route-") as tmp:
        bed = Bed(CONFIG, options, Path(tmp), "cpu")
        env = _server_env(bed)
        sides, serves = {}, []
        try:
            for name, extra in (("plain", ()), ("routed", ("--route-by-task", str(cache_tasks)))):
                serve = RayServe(
                    Path(tmp) / f"{name}.log",
                    env,
                    replicas=2,
                    replica_cpus=1,
                    extra_args=("--log-level", "warning", *extra),
                )
                serves.append(serve)
                serve.wait_ready()
                sides[name] = (RaySide(serve), _chooser(bed, n_tasks))
            runs = {name: [] for name in sides}
            names = list(sides)
            for r in range(repeats):
                for name in names[r % 2 :] + names[: r % 2]:
                    side, choose = sides[name]
                    runs[name].append(summary(bed.load(side, choose, seed=r)))
        finally:
            for serve in serves:
                serve.stop()
    per_cpu = {k: [r["images_per_cpu_s"] for r in v] for k, v in runs.items()}
    per_s = {k: [r["images_per_s"] for r in v] for k, v in runs.items()}
    return {
        "runs": runs,
        "routed_over_plain_per_cpu_s": ratios(per_cpu["routed"], per_cpu["plain"]),
        "routed_over_plain_per_s": ratios(per_s["routed"], per_s["plain"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--cache-tasks", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-s", type=float, default=8.0)
    p.add_argument("--out", default="", help="also write the markdown here")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = run(args.tasks, args.cache_tasks, args.repeats, args.window_s)
    lines = [
        f"`python -m bench.ray_routing {' '.join(sys.argv[1:])}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared): {CONFIG.label}, ×{CONFIG.clients} clients, "
        f"{args.tasks} tasks uniformly, 2 replicas with room for {args.cache_tasks} each.",
        "",
        "| side | img/s | img per CPU-s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in out["runs"].items():
        lines.append(
            f"| {name} | {Spread.of([r['images_per_s'] for r in rs]).fmt(1)} | "
            f"{Spread.of([r['images_per_cpu_s'] for r in rs]).fmt(1)} | "
            f"{Spread.of([r['p50_ms'] for r in rs]).fmt(0)} | "
            f"{Spread.of([r['p99_ms'] for r in rs]).fmt(0)} | "
            f"{sum(sum(r['errors'].values()) for r in rs)} |"
        )
    lines += [
        "",
        f"routed ÷ plain: {out['routed_over_plain_per_s'].fmt()} per second, "
        f"{out['routed_over_plain_per_cpu_s'].fmt()} per CPU-second.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
