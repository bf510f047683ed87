"""The test bed for one backbone: its tasks, images, our server, and prepared requests."""

from __future__ import annotations

import dataclasses
import random
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import fixtures, loadgen, procs
from bench.fixtures import Config
from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.server.catalog import Task
from piggyback_serve.server.engine import Worker
from piggyback_serve.server.engine.placement import place
from piggyback_serve.server.settings import Settings


@dataclass(frozen=True)
class Options:
    """How much to measure: every run is bounded by these, in count and in time."""

    repeats: int = 3
    window_s: float = 3.0  # one measurement of one side
    warmup_s: float = 1.0
    max_requests: int = 5000  # per measurement, whatever the window
    n_tasks: int = 100
    peer_models: int = 10  # full copies each peer replica keeps loaded (an LRU)
    scale_counts: tuple[int, ...] = (10, 100, 1000)
    cold_repeats: int = 7
    fairness_s: float = 5.0
    load_fraction: float = 0.7  # open loop: this fraction of the closed loop's rate
    quick: bool = False


@dataclass
class Bed:
    config: Config
    options: Options
    workdir: Path
    device: str
    backbone: Backbone = field(init=False)
    names: list[str] = field(init=False)
    images: list[bytes] = field(init=False)
    params_bytes: int = field(init=False)
    server: procs.Proc | None = field(init=False, default=None)
    server_start_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        started = time.perf_counter()
        self.backbone = fixtures.backbone_for(self.config)
        self.registry = self.workdir / f"registry-{self.config.backbone}-{self.config.input_size}"
        self.names = fixtures.write_registry(
            self.registry, self.backbone, self.options.n_tasks, self.config.input_size
        )
        self.images = fixtures.jpegs(self.config.input_size)
        self.params_bytes = sum(t.nbytes for t in self.backbone.module.state_dict().values())
        self.setup_s = time.perf_counter() - started

    def artifact(self, i: int):
        return artifacts.read(self.registry / f"{self.names[i]}.safetensors")

    def task(self, i: int, worker: Worker) -> Task:
        """Task i as the server registers it: parsed, validated, prepared by `worker`."""
        path = self.registry / f"{self.names[i]}.safetensors"
        art = artifacts.load(path, self.backbone)
        return Task(self.names[i], "bench", path.stat().st_size, art, worker.prepare(art))

    def start_server(self, extra_env: dict[str, str] | None = None) -> procs.Proc:
        self.server = procs.start_ours(
            self.workdir,
            self.registry,
            self.config.backbone,
            self.config.weights,
            self.config.batch,
            tag=f"ours-{self.config.backbone}",
            extra_env={"PIGGY_DEVICE": self.device, **(extra_env or {})},
        )
        self.server_start_s = self.server.wait_ready("/readyz", 300)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # -- requests --------------------------------------------------------------------

    def predict(self, task: str, image: int = 0, tag: str | None = None) -> loadgen.Request:
        body = self.images[image % len(self.images)]
        return loadgen.Request.post(
            f"/predict?task={task}&top_k=5", body, "image/jpeg", tag=tag or task
        )

    def uniform(self, n_tasks: int):
        """A chooser: a task among the first n_tasks, uniformly at random."""
        requests = [
            [self.predict(name, j) for j in range(len(self.images))]
            for name in self.names[:n_tasks]
        ]

        def choose(rng: random.Random) -> loadgen.Request:
            return rng.choice(requests[rng.randrange(n_tasks)])

        return choose

    def load(self, proc: procs.Proc, choose, seed: int = 0, seconds: float | None = None):
        """One bounded closed-loop measurement, after a warm-up of the same traffic.

        Also records the CPU seconds the server (all its processes) spent meanwhile.
        """
        o = self.options
        clients = self.config.clients
        if o.warmup_s > 0:
            loadgen.run(proc.port, choose, clients, o.max_requests, o.warmup_s, seed=seed + 10_000)
        cpu, batches = proc.cpu_s(children=True), self.batches(proc)
        result = loadgen.run(
            proc.port, choose, clients, o.max_requests, seconds or o.window_s, seed=seed
        ).check()
        result.cpu_s = proc.cpu_s(children=True) - cpu
        after = self.batches(proc)
        if batches and after and after[1] > batches[1]:
            result.mean_batch = (after[0] - batches[0]) / (after[1] - batches[1])
        return result

    def open_load(self, proc: procs.Proc, choose, rate: float, seconds: float, seed: int = 0):
        """One bounded open-loop measurement at `rate` requests per second."""
        return loadgen.run_open(
            proc.port, choose, rate, seconds, max_requests=self.options.max_requests, seed=seed
        ).check()

    def batches(self, proc: procs.Proc) -> tuple[float, float] | None:
        """Our server's (images, batches) so far, from /metrics; None for a peer."""
        if proc is not self.server:
            return None
        with urllib.request.urlopen(proc.url("/metrics"), timeout=10) as r:
            text = r.read().decode()
        found = dict.fromkeys(("piggy_batch_size_sum", "piggy_batch_size_count"), 0.0)
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in found:
                found[name] = float(value)
        return found["piggy_batch_size_sum"], found["piggy_batch_size_count"]


def local_worker(backbone: Backbone, device: str = "cpu", one_pass: bool | None = None) -> Worker:
    """ONE engine worker in this process, configured as the server's first worker would be
    (mixed-batch mode by device unless `one_pass` says); torch threads as this process has."""
    config = place(Settings(backbone=backbone.name, device=device, engine_workers=1))[0]
    if one_pass is not None:
        config = dataclasses.replace(config, one_pass=one_pass)
    return Worker.local(config, backbone)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
