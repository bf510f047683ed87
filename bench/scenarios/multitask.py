"""Many tasks at the speed of one.

In-process (any device): a task switch vs a batch-1 forward; the engine on one task vs
the plain module; mixed batches (1x8, 2x4, 4x2, 8x1) run per task (the batch split by
task, the working copy patched between pieces) and in one pass: with the way chosen per
layer (one-pass), forced to corrections (GATHER_COST = 0) and forced to per-task segments
(GATHER_COST = 1e12), with time per layer kind.
Over HTTP (CPU): 200 tasks vs one, 4 tasks in turn vs one, server memory per task.
Rates are images per CPU second of the measured process (and wall-clock images/s).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench import fixtures, loadgen, procs, timing
from bench.fixtures import Config
from bench.stats import Spread, ratios
from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.artifact import TaskArtifact, pack_mask
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.masks.demo import BUNDLED_DIR
from piggyback_serve.server.engine import Row, Worker, mixed
from piggyback_serve.server.engine.config import WorkerConfig

DEMO = BUNDLED_DIR
MIXES = ((1, 8), (2, 4), (4, 2), (8, 1))  # (tasks, rows each)
# Per strategy: the GATHER_COST of one pass (server/engine/mixed.py), or None: per task.
STRATEGIES = {
    "per-task": None,
    "one-pass": mixed.GATHER_COST,
    "corrections": 0.0,
    "segments": 1e12,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# Tasks


def switch_off_more(art: TaskArtifact, fraction: float, seed: int, name: str) -> TaskArtifact:
    """`art` with a further `fraction` of each mask's bits switched off (a random set)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for key, mask in art.masks.items():
        numel = mask.numel if mask.numel is not None else mask.bits.numel() * 8
        keep = art.mask(key, (numel,)) & (torch.rand(numel, generator=g) >= fraction)
        masks[key] = pack_mask(keep)
    return TaskArtifact(**{**art.__dict__, "masks": masks, "task": name})


def synthetic(backbone: Backbone, name: str, seed: int, size: int, off: float) -> TaskArtifact:
    """A fixtures-style synthetic task with about `off` of its mask bits switched off."""
    art = fixtures.make_artifact(backbone, name, seed, size)
    rng = np.random.default_rng(seed)
    masks = {}
    for key in art.masks:
        numel = backbone.maskable()[key].numel()
        keep = torch.from_numpy(rng.random(numel) >= off)
        masks[key] = pack_mask(keep)
    return TaskArtifact(**{**art.__dict__, "masks": masks})


def write_tasks(folder: Path, backbone: Backbone, config: Config, n: int) -> list[str]:
    """`n` distinct tasks in `folder`: the mnist demo task + 0.5% more off (effnet), or
    synthetic tasks ~1% off (others). Their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [fixtures.task_name(i) for i in range(n)]
    base = None
    if config.weights is None and (DEMO / "mnist.safetensors").exists():
        base = artifacts.read(DEMO / "mnist.safetensors")
        if base.backbone != backbone.name or base.input_size != config.input_size:
            base = None
    for i, name in enumerate(names):
        path = folder / f"{name}.safetensors"
        if path.exists():
            continue
        if base is not None:
            art = switch_off_more(base, 0.005, i, name)
        else:
            art = synthetic(backbone, name, i, config.input_size, 0.01)
        path.write_bytes(artifacts.to_bytes(art))
    return names


# ---------------------------------------------------------------------------------------
# In-process


class Bench:
    """Two engine workers in this process, one per mixed-batch mode (a worker's mode is
    fixed when it is built), with `n` prepared tasks, and the plain module, on one device.
    `worker` is the one the server would run there (per task on the CPU)."""

    def __init__(self, config: Config, backbone: Backbone, folder: Path, n: int, device: str):
        self.config = config
        self.device = torch.device(device)
        self.workers = {
            mode: Worker.local(
                WorkerConfig(index=0, device=device, dtype="float32", threads=1, one_pass=mode),
                backbone,
            )
            for mode in (False, True)
        }
        self.worker = self.workers[self.device.type != "cpu"]
        names = write_tasks(folder, backbone, config, n)
        self.arts = [artifacts.load(folder / f"{m}.safetensors", backbone) for m in names]
        self.artifact_bytes = (folder / f"{names[0]}.safetensors").stat().st_size
        # States with the one-pass tables serve both workers (per task reads `zeroed` only).
        self.states = [self.workers[True].prepare(a) for a in self.arts]
        self.keys = [(m, "bench") for m in names]
        self.plain = copy.deepcopy(backbone.module).to(self.device)
        self.plain.to(memory_format=torch.channels_last).eval()
        self.images = fixtures.jpegs(config.input_size)
        self.backbone = backbone

    def batch(self, n: int) -> torch.Tensor:
        x = fixtures.tensor_batch(self.images, self.backbone, self.config.input_size, n)
        return x.to(self.device)

    def rows(self, tasks: int, each: int) -> list[Row]:
        return [Row(self.keys[t], self.states[t]) for t in range(tasks) for _ in range(each)]

    def plain_step(self, x: torch.Tensor):
        x = x.contiguous(memory_format=torch.channels_last)

        def step():
            with torch.inference_mode():
                self.plain(x)

        return step

    def predict_step(self, rows: list[Row], x: torch.Tensor, worker: Worker | None = None):
        worker = worker or self.worker
        return lambda: worker.step(rows, x)

    def close(self) -> None:
        self.workers.clear()


def median_s(fn, repeats: int, device: torch.device) -> float:
    """Median seconds per call of `fn()`: CPU seconds of this process on the CPU (the host
    is shared, so wall time mostly measures the other tenants), wall time on CUDA."""
    return timing.ms(fn, 0.05 * repeats) / 1e3


def switch_figure(b: Bench, repeats: int) -> dict:
    """Median of a working-copy switch between two tasks vs a batch-1 plain forward."""
    keys, states = b.keys[:2], b.states[:2]
    flip = [0]

    def switch():
        i = flip[0] = 1 - flip[0]
        b.worker._switch(keys[i], b.worker._device_state(keys[i], states[i]))

    forward = b.plain_step(b.batch(1))
    switch(), forward()
    sw, fw = [], []
    for _ in range(repeats):  # interleaved
        sw.append(median_s(switch, 5, b.device))
        fw.append(median_s(forward, 5, b.device))
    return {"switch_ms": [1e3 * t for t in sw], "forward_b1_ms": [1e3 * t for t in fw]}


def engine_vs_plain(b: Bench, batch: int, repeats: int, seconds: float) -> dict:
    x = b.batch(batch)
    steps = {"plain": b.plain_step(x), "engine": b.predict_step(b.rows(1, batch), x)}
    out = {k: [] for k in steps}
    for r in range(repeats):
        for k in sorted(steps, reverse=bool(r % 2)):
            out[k].append(timing.rate(steps[k], batch, seconds))
    return out


# -- mixed batches, with time per layer kind ---------------------------------------------


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        return "pointwise" if module.kernel_size == (1, 1) else "kxk"
    return "other"


class LayerTimer:
    """Wall time per layer kind of the engine's masked layers, corrections included.

    Pre-hooks stay; the post-hooks are re-registered after MixedForward's own hooks, so
    they time the layer plus its correction."""

    def __init__(self, b: Bench, worker: Worker):
        self.b = b
        self.layers = worker.working.layers  # the masked layers, in slot order
        self.clock = time.perf_counter if b.device.type == "cuda" else time.process_time
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self._pre = [m.register_forward_pre_hook(self._begin(i)) for i, m in enumerate(self.layers)]
        self._post: list = []
        self._enter = mixed.MixedForward.__enter__
        timer = self

        def enter(forward_self):
            out = timer._enter(forward_self)
            timer._rehook()
            return out

        mixed.MixedForward.__enter__ = enter
        self._rehook()

    def _begin(self, i: int):
        def hook(module, args):
            sync(self.b.device)
            self._start[i] = self.clock()

        return hook

    def _end(self, i: int, kind: str):
        def hook(module, args, output):
            sync(self.b.device)
            self.totals[kind] += self.clock() - self._start.pop(i, self.clock())

        return hook

    def _rehook(self) -> None:
        for h in self._post:
            h.remove()
        self._post = [
            m.register_forward_hook(self._end(i, layer_kind(m))) for i, m in enumerate(self.layers)
        ]

    def close(self) -> None:
        mixed.MixedForward.__enter__ = self._enter
        for h in self._pre + self._post:
            h.remove()


def mixed_table(b: Bench, repeats: int, batch: int = 8, per_layer: bool = True) -> dict:
    """ms per batch for each mix and strategy, interleaved; and per layer kind."""
    x = b.batch(batch)
    out: dict = {"ms": defaultdict(list), "layers_ms": {}}
    saved = mixed.GATHER_COST
    mixes = [(t, batch // t) for t, _ in MIXES if batch % t == 0]

    def use(cost: float | None) -> Worker:
        """The worker of this strategy's mode, GATHER_COST set for it."""
        mixed.GATHER_COST = saved if cost is None else cost
        return b.workers[cost is not None]

    try:
        for r in range(repeats):
            for strategy, cost in STRATEGIES.items():
                worker = use(cost)
                for tasks, each in mixes[r % 2 :] + mixes[: r % 2]:
                    step = b.predict_step(b.rows(tasks, each), x, worker)
                    step()
                    out["ms"][f"{strategy} {tasks}x{each}"].append(
                        1e3 * median_s(step, 3, b.device)
                    )
        if per_layer:
            for strategy, cost in STRATEGIES.items():
                if cost is None:
                    continue  # per task runs whole forwards: no per-layer split to show
                worker = use(cost)
                for tasks, each in mixes:
                    timer = LayerTimer(b, worker)
                    try:
                        step = b.predict_step(b.rows(tasks, each), x, worker)
                        step()
                        timer.totals.clear()
                        for _ in range(3):
                            step()
                        kinds = {k: 1e3 * v / 3 for k, v in timer.totals.items()}
                    finally:
                        timer.close()
                    out["layers_ms"][f"{strategy} {tasks}x{each}"] = kinds
    finally:
        mixed.GATHER_COST = saved
    out["ms"] = dict(out["ms"])
    return out


def in_process(b: Bench, repeats: int, seconds: float, batch: int = 8) -> dict:
    return {
        "switch": switch_figure(b, repeats),
        "engine_vs_plain": engine_vs_plain(b, batch, repeats, seconds),
        "mixed": mixed_table(b, repeats, batch),
        "artifact_bytes": b.artifact_bytes,
        "task_state_bytes": statistics.mean(s.nbytes for s in b.states),
    }


# ---------------------------------------------------------------------------------------
# Over HTTP


def round_robin(requests: list[loadgen.Request]):
    turn = [0]

    def choose(rng) -> loadgen.Request:
        turn[0] += 1
        return requests[turn[0] % len(requests)]

    return choose


def metric(proc: procs.Proc, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(proc.url("/metrics"), timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def http(
    workdir: Path,
    folder: Path,
    config: Config,
    names: list[str],
    repeats: int,
    seconds: float,
    warmup_s: float,
    clients: int = 8,
) -> dict:
    """One task vs 200 (uniform) vs 4 (in turn), 8 clients, sides interleaved; memory."""
    images = fixtures.jpegs(config.input_size)

    def req(name, j=0):
        body = images[j % len(images)]
        return loadgen.Request.post(f"/predict?task={name}&top_k=5", body, "image/jpeg")

    sides = {
        "one": lambda: round_robin([req(names[0], j) for j in range(4)]),
        "many": lambda: (lambda rs: lambda rng: rng.choice(rs))(
            [req(m, i) for i, m in enumerate(names)]
        ),
        "mixed4": lambda: round_robin([req(m, i) for i, m in enumerate(names[:4])]),
    }
    out: dict = {k: [] for k in sides}
    one_folder = folder.parent / (folder.name + "-one")
    one_folder.mkdir(exist_ok=True)
    (one_folder / f"{names[0]}.safetensors").write_bytes(
        (folder / f"{names[0]}.safetensors").read_bytes()
    )
    proc = start(workdir, one_folder, config, "one")
    try:
        loadgen.run(proc.port, sides["one"](), clients, 2000, warmup_s)
        out["rss_one_task"] = proc.rss_bytes(children=True)
    finally:
        proc.stop()
    proc = start(workdir, folder, config, "many")
    try:
        for name in names:  # every task used once
            loadgen.run(proc.port, lambda rng, n=name: req(n), 1, 1, 30)
        for r in range(repeats):
            order = list(sides)
            order = order[r % 3 :] + order[: r % 3]
            for side in order:
                choose = sides[side]()
                loadgen.run(proc.port, choose, clients, 2000, warmup_s, seed=r + 100)
                cpu = proc.cpu_s(children=True)
                res = loadgen.run(proc.port, choose, clients, 5000, seconds, seed=r).check()
                used = proc.cpu_s(children=True) - cpu
                out[side].append(
                    {
                        "images_per_s": res.images_per_s,
                        "images_per_cpu_s": res.images / used if used else None,
                        "errors": dict(res.errors),
                        "p50_ms": res.p(50),
                    }
                )
        out["rss_many"] = proc.rss_bytes(children=True)
        out["task_state_bytes"] = metric(proc, "piggy_task_state_bytes")
        out["switches"] = metric(proc, "piggy_task_switches_total")
        out["mixed_batches"] = metric(proc, "piggy_mixed_batches_total")
    finally:
        proc.stop()
    out["n_tasks"] = len(names)
    out["artifact_bytes"] = (folder / f"{names[0]}.safetensors").stat().st_size
    return out


def start(workdir: Path, folder: Path, config: Config, tag: str) -> procs.Proc:
    proc = procs.start_ours(
        workdir,
        folder,
        config.backbone,
        config.weights,
        config.batch,
        tag=f"{tag}-{config.backbone}",
        extra_env={"PIGGY_DEVICE": "cpu"},
    )
    proc.wait_ready("/readyz", 600)
    return proc


# ---------------------------------------------------------------------------------------
# The scenario

CONFIGS = [Config("efficientnet_lite0", None, 64, 8, 8), Config("resnet18", "random", 64, 8, 8)]
QUICK = [Config("resnet18", "random", 32, 8, 8)]


def measure(ctx) -> dict:
    """In process, then over HTTP, per backbone (CPU)."""
    import sys
    import tempfile

    o = ctx.options
    configs, tasks = (QUICK, 8) if o.quick else (CONFIGS, 200)
    repeats, window_s = (1, 0.3) if o.quick else (o.repeats, o.window_s)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="piggy-mt-") as tmp:
        work = Path(tmp)
        for cfg in configs:
            print(f"[multitask] {cfg.label}", file=sys.stderr, flush=True)
            backbone = fixtures.backbone_for(cfg)
            folder = work / f"reg-{cfg.backbone}"
            names = write_tasks(folder, backbone, cfg, tasks)
            b = Bench(cfg, backbone, folder, min(8, tasks), "cpu")
            try:
                bed = {"in_process": in_process(b, repeats, window_s)}
            finally:
                b.close()
            warm = min(1.0, window_s / 2)
            bed["http"] = http(work, folder, cfg, names, repeats, window_s, warm)
            results[cfg.label] = bed
    return results


def ratio(a: list[float], b: list[float]) -> Spread:
    return ratios([x or math.nan for x in a], [y or math.nan for y in b])


def rates(runs: list[dict], key: str = "images_per_cpu_s") -> list[float]:
    return [r.get(key) or math.nan for r in runs]


def figures(res: dict) -> dict[str, Spread | float]:
    """The figures of one backbone's results."""
    out: dict[str, Spread | float] = {}
    ip, h = res.get("in_process"), res.get("http")
    if h:
        out["many ÷ one task, 200 tasks, HTTP"] = ratio(rates(h["many"]), rates(h["one"]))
        out["mixed ÷ one task, 4 tasks, HTTP"] = ratio(rates(h["mixed4"]), rates(h["one"]))
        growth = (h["rss_many"] - h["rss_one_task"]) / (h["n_tasks"] - 1)
        out["server memory per task ÷ artifact bytes (RSS)"] = growth / h["artifact_bytes"]
        out["task state bytes per task ÷ artifact bytes"] = (
            h["task_state_bytes"] / h["n_tasks"] / h["artifact_bytes"]
        )
    if ip:
        s = ip["switch"]
        out["task switch ÷ batch-1 forward"] = ratio(s["switch_ms"], s["forward_b1_ms"])
        e = ip["engine_vs_plain"]
        out["engine ÷ plain model, one task, in-process"] = ratio(
            rates(e["engine"]), rates(e["plain"])
        )
    return out


KINDS = ("depthwise", "kxk", "pointwise", "linear")


def mixed_rows(label: str, m: dict) -> tuple[list, list]:
    """The mixed-batch table's rows and the per-layer-kind rows of one backbone."""
    mixes = sorted({k.split()[1] for k in m["ms"]}, key=lambda mix: int(mix.split("x")[0]))
    rows, layers = [], []
    for mix in mixes:
        vals = {s: Spread.of(m["ms"][f"{s} {mix}"]) for s in STRATEGIES if f"{s} {mix}" in m["ms"]}
        best = min(vals, key=lambda s: vals[s].median)
        rows.append([label, mix, *(vals.get(s) for s in STRATEGIES), best])
    for key, kinds in m.get("layers_ms", {}).items():
        strategy, mix = key.split()
        layers.append([label, mix, strategy, *(kinds.get(k) for k in KINDS)])
    return rows, layers


def summarize(results: dict) -> dict:
    figs, http_rows, mixed, layers = [], [], [], []
    for label, res in results.items():
        figs += [{"figure": f, "on": label, "value": v} for f, v in figures(res).items()]
        for side in ("one", "many", "mixed4"):
            runs = res["http"][side]
            http_rows.append(
                [
                    label,
                    side,
                    Spread.of(rates(runs, "images_per_s")),
                    Spread.of(rates(runs)),
                    Spread.of([r["p50_ms"] for r in runs]),
                    sum(sum(r["errors"].values()) for r in runs),
                ]
            )
        rows, kinds = mixed_rows(label, res["in_process"]["mixed"])
        mixed += rows
        layers += kinds
    return {"figures": figs, "tables": {"http": http_rows, "mixed": mixed, "layers": layers}}
