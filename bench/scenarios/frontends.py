"""HTTP front ends: what `PIGGY_FRONTENDS` buys on the CPU, and what a front end costs.

Every server here is our server (a subprocess, bench/procs.py) serving one synthetic task
on the demo backbone, efficientnet_lite0 with its real weights; 8 clients in a closed loop
(throughput, not latency) post JPEGs to /predict; every window is bounded in time and in
requests, and CPU is read per process role (bench/procs.py's `roles`) before and after it.
The machine may be shared: before a window we wait (at most 15 s) for it to go quiet, and a
window in which other processes kept over 0.3 cores busy is measured again (within a
budget); every window records the cores the load generator and the other processes used.

- front-end-bound load: a 64 px task, one engine worker, 4032x3024 phone photos (the
  natural photos upscaled, made at run time), PIGGY_FRONTENDS=1 (the single-process server)
  against 2; both servers up, windows alternating (1, 2, 2, 1, ...): images/s of each, and
  2 ÷ 1 per pair of windows;
- front-end CPU-ms per image: a 224 px task, the default engine workers, JPEG photos
  (451x300 to 640x427) and phone photos, PIGGY_FRONTENDS unset (one process) and 2. The
  front end's CPU is every server process but the engine workers and multiprocessing's
  helpers: the server process (with front ends, the supervisor, which is also the engine
  service: batcher, service socket) plus the front-end processes. The helpers (forkserver,
  resource trackers, torch_shm_manager) are counted apart, on neither side;
- cores busy: the default server (PIGGY_FRONTENDS unset, the default engine workers) at
  224 px with JPEG photos: CPU seconds of the whole server tree ÷ wall seconds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import fixtures, loadgen, procs
from bench.fixtures import Config
from bench.stats import Spread, ratios

CLIENTS = 8
BATCH = 8
SMALL = Config("efficientnet_lite0", None, 64, BATCH, CLIENTS)
LARGE = Config("efficientnet_lite0", None, 224, BATCH, CLIENTS)
QUICK = Config("resnet18", "random", 32, 4, 4)
MAX_REQUESTS = 20_000  # per window, whatever its length
QUIET_WAIT_S = 15.0  # before a window, for the machine's other tenants to go quiet
QUIET_CORES = 0.3
RETRY_BUDGET_S = 150.0  # per phase: windows measured again next to other tenants' work

RATIO = (
    "images/s, 2 front ends ÷ 1, front-end-bound load (phone photos, 64 px task, 1 engine worker)"
)
PHOTOS = "front-end CPU-ms per image, 224 px task, JPEG photos 451x300-640x427"
PHONE = "front-end CPU-ms per image, 224 px task, 4032x3024 phone photo"
CORES = "cores busy at 224 px, 8 clients, 2 cores"
FIGURES = (RATIO, PHOTOS, PHONE, CORES)


def start(workdir: Path, cfg: Config, backbone, tag: str, env: dict[str, str]) -> procs.Proc:
    """Our server in its own home folder, serving one synthetic task of `cfg`'s size."""
    home = workdir / tag
    registry = home / "registry"
    fixtures.write_registry(registry, backbone, 1, cfg.input_size)
    proc = procs.start_ours(
        home, registry, cfg.backbone, cfg.weights, cfg.batch, tag=tag,
        extra_env={"PIGGY_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE", **env},
    )  # fmt: skip
    proc.wait_ready("/readyz", 600)
    return proc


def window(proc: procs.Proc, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """One closed-loop window after a short warm-up: images, wall, CPU by role. A window
    in which other processes kept more than QUIET_CORES busy is measured again, while the
    scenario's retry budget lasts; the windows set aside are kept in `set_aside`."""
    set_aside = []
    while True:
        w = _window(proc, bodies, clients, seconds)
        if w["others_cores"] <= QUIET_CORES or time.perf_counter() > _retry_until[0]:
            return {**w, "set_aside": set_aside}
        set_aside.append(w)
        _log(f"window set aside: other processes kept {w['others_cores']:.2f} cores busy")


_retry_until = [0.0]  # perf_counter time past which no window is measured again


def _window(proc: procs.Proc, bodies: list[bytes], clients: int, seconds: float) -> dict:
    task = fixtures.task_name(0)
    reqs = [loadgen.Request.post(f"/predict?task={task}", b, "image/jpeg") for b in bodies]
    choose = lambda rng: rng.choice(reqs)  # noqa: E731
    quiet = procs.wait_quiet(QUIET_WAIT_S, QUIET_CORES)
    loadgen.run(proc.port, choose, clients, 500, min(2.0, seconds / 4), seed=99)
    cpu0, own0, busy0 = proc.cpu_by_role(), _own(), procs.machine_busy_s()
    t0 = time.perf_counter()
    res = loadgen.run(proc.port, choose, clients, MAX_REQUESTS, seconds).check()
    cpu1, own1, busy1 = proc.cpu_by_role(), _own(), procs.machine_busy_s()
    wall = time.perf_counter() - t0
    cpu = {role: cpu1[role] - cpu0[role] for role in cpu1}
    return {
        "images": res.images,
        "wall_s": wall,
        "images_per_s": res.images_per_s,
        "cpu_s": cpu,
        # the load generator (this process), and whatever else ran on the machine meanwhile
        "client_cores": (own1 - own0) / wall,
        "others_cores": (busy1 - busy0 - (own1 - own0) - sum(cpu.values())) / wall,
        "quiet_before": quiet,
        "errors": sum(res.errors.values()),
        "p50_ms": res.p(50),
    }


def _own() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def frontend_ms(w: dict) -> float:
    """Front-end CPU ms per image answered: the server process plus the front ends."""
    return 1e3 * (w["cpu_s"]["main"] + w["cpu_s"]["frontends"]) / max(w["images"], 1)


def cores_busy(w: dict) -> float:
    return sum(w["cpu_s"].values()) / w["wall_s"]


def bound(work: Path, cfg: Config, backbone, bodies, repeats: int, seconds: float) -> dict:
    """PIGGY_FRONTENDS=1 against 2, one engine worker, both servers up, windows alternating."""
    servers = {}
    runs: dict[str, list] = {"1": [], "2": []}
    try:
        for n in runs:
            env = {"PIGGY_FRONTENDS": n, "PIGGY_ENGINE_WORKERS": "1"}
            servers[n] = start(work, cfg, backbone, f"bound-fe{n}", env)
        for r in range(repeats):
            for n in ("1", "2") if r % 2 == 0 else ("2", "1"):
                runs[n].append(window(servers[n], bodies, CLIENTS, seconds))
                _log(f"bound fe{n}: {runs[n][-1]['images_per_s']:.1f} images/s")
    finally:
        for proc in servers.values():
            proc.stop()
    return runs


def costs(work: Path, cfg: Config, backbone, inputs, repeats: int, seconds: float) -> dict:
    """The default server and PIGGY_FRONTENDS=2, each input in turn, windows alternating."""
    sides = {"default": {}, "2": {"PIGGY_FRONTENDS": "2"}}
    servers = {}
    runs = {side: {case: [] for case in inputs} for side in sides}
    try:
        for side, env in sides.items():
            servers[side] = start(work, cfg, backbone, f"cost-{side}", env)
        for r in range(repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for case, bodies in inputs.items():
                for side in order:
                    runs[side][case].append(window(servers[side], bodies, CLIENTS, seconds))
                    w = runs[side][case][-1]
                    _log(f"cost {side} {case}: {frontend_ms(w):.2f} ms, {cores_busy(w):.2f} cores")
    finally:
        for proc in servers.values():
            proc.stop()
    return runs


def measure(ctx) -> dict:
    o = ctx.options
    quick = o.quick
    repeats = max(2, o.repeats) if quick else max(3, o.repeats)
    seconds = o.window_s if quick else max(6.0, o.window_s)
    small, large = (QUICK, QUICK) if quick else (SMALL, LARGE)
    phone = fixtures.phone_jpegs(1 if quick else 4)
    out: dict = {"clients": CLIENTS, "repeats": repeats, "window_s": seconds}
    with tempfile.TemporaryDirectory(prefix="piggy-frontends-") as tmp:
        work = Path(tmp)
        backbone = fixtures.backbone_for(small)
        _retry_until[0] = time.perf_counter() + (0 if quick else RETRY_BUDGET_S)
        out["bound"] = {
            "config": small.label,
            "runs": bound(work, small, backbone, phone, repeats, seconds),
        }
        backbone = fixtures.backbone_for(large)
        inputs = {"photos": fixtures.photo_jpegs(), "phone": phone}
        _retry_until[0] = time.perf_counter() + (0 if quick else RETRY_BUDGET_S)
        out["costs"] = {
            "config": large.label,
            "runs": costs(work, large, backbone, inputs, repeats, seconds),
        }
    return out


def _log(msg: str) -> None:
    print(f"[frontends] {msg}", file=sys.stderr, flush=True)


# -- the figures and tables --------------------------------------------------------------


def quiet(w: dict) -> bool:
    """Whether other processes kept at most QUIET_CORES busy during the window."""
    return w.get("others_cores", 0.0) <= QUIET_CORES


def quiet_only(runs: list[dict]) -> list[dict]:
    """The windows beside no other tenant's work; all of them when there is none such."""
    return [w for w in runs if quiet(w)] or runs


def summarize(raw: dict) -> dict:
    """Figures from the quiet windows (every window when none was quiet); the tables show
    every window kept."""
    figures, windows = [], []
    bound_runs = raw["bound"]["runs"]
    pairs = list(zip(bound_runs["1"], bound_runs["2"], strict=False))
    pairs = [(a, b) for a, b in pairs if quiet(a) and quiet(b)] or pairs
    one = [a["images_per_s"] for a, _ in pairs]
    two = [b["images_per_s"] for _, b in pairs]
    figures.append({"figure": RATIO, "on": raw["bound"]["config"], "value": ratios(two, one)})
    cost_runs = raw["costs"]["runs"]
    named = {"photos": PHOTOS, "phone": PHONE}
    for side, cases in cost_runs.items():
        on = "1 process (default)" if side == "default" else f"{side} front ends"
        for case, runs in cases.items():
            ms = Spread.of([frontend_ms(w) for w in quiet_only(runs)])
            figures.append({"figure": named[case], "on": on, "value": ms})
    default_photos = cost_runs["default"]["photos"]
    figures.append(
        {
            "figure": CORES,
            "on": "1 process (default), default engine workers",
            "value": Spread.of([cores_busy(w) for w in quiet_only(default_photos)]),
        }
    )
    summary = []
    groups = [("front-end-bound", n, "phone", runs) for n, runs in bound_runs.items()]
    groups += [
        ("224 px", side, case, runs) for side, cases in cost_runs.items()
        for case, runs in cases.items()
    ]  # fmt: skip
    for load, side, case, runs in groups:
        kept = quiet_only(runs)
        summary.append(
            [load, side, case, f"{sum(map(quiet, runs))} of {len(runs)}",
             Spread.of([w["images_per_s"] for w in kept]),
             Spread.of([frontend_ms(w) for w in kept]),
             Spread.of([cores_busy(w) for w in kept])]
        )  # fmt: skip
    for load, groups in (("front-end-bound", {"": bound_runs}), ("224 px", cost_runs)):
        for side, cases in groups.items():
            for case, runs in cases.items():
                for i, w in enumerate(runs):
                    c = w["cpu_s"]
                    windows.append(
                        [load, side or case, "phone" if load == "front-end-bound" else case,
                         i, w["images"], w["wall_s"], w["images_per_s"], c["main"],
                         c["frontends"], c["engine"], c["helpers"], frontend_ms(w),
                         cores_busy(w), w.get("client_cores"), w.get("others_cores"),
                         w["errors"]]
                    )  # fmt: skip
    return {"figures": figures, "tables": {"summary": summary, "windows": windows}}
