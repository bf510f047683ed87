"""The peers, same images, same tasks, same load generator, interleaved.

ray100  Ray Serve, a full fine-tuned copy per task, an @serve.multiplexed LRU of
        `peer_models` copies per replica, 100 tasks
ours100 our server, the same 100 tasks
lit1    LitServe serving one fine-tuned copy with its batching (multipart bodies)
ours1   our server, one task, the same multipart bodies
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import time
import urllib.request

import torch

from bench import fixtures, loadgen
from bench.bed import Bed
from bench.procs import Proc, start_module
from bench.scenarios.serving import rates, summary
from bench.stats import Spread, ratios


def _multipart_chooser(bed: Bed, path_for, n_tasks: int, headers_for=None):
    requests = []
    for name in bed.names[:n_tasks]:
        for image in bed.images:
            body, ctype = loadgen.multipart("file", "image.jpg", image, "image/jpeg")
            headers = headers_for(name) if headers_for else None
            requests.append(loadgen.Request.post(path_for(name), body, ctype, headers, tag=name))
    return lambda rng: rng.choice(requests)


def _raw_chooser(bed: Bed, n_tasks: int):
    """Ray Serve gets the raw body, and the task in the multiplexing header."""
    requests = [
        loadgen.Request.post(
            "/", image, "image/jpeg", {"serve_multiplexed_model_id": name}, tag=name
        )
        for name in bed.names[:n_tasks]
        for image in bed.images
    ]

    def choose(rng: random.Random):
        return rng.choice(requests)

    return choose


def _start(
    bed: Bed, module: str, args: list[str], tag: str, ready_path: str
) -> tuple[Proc | None, dict]:
    started = time.perf_counter()
    proc = start_module(bed.workdir, module, args, tag)
    try:
        proc.wait_ready(ready_path, 300)
    except Exception as exc:  # noqa: BLE001 - a peer that won't run is reported, not fatal
        proc.stop()
        return None, {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    return proc, {"startup_s": time.perf_counter() - started}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _top(url: str, body: bytes, headers: dict) -> list[str]:
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as r:
        return [t["label"] for t in json.load(r)["results"][0]["top"]]


def _same_answers(bed: Bed, ray: Proc | None) -> bool | None:
    """Do the peer's full copy and our masked task give the same top-5 for one image?"""
    if ray is None:
        return None
    name, image = bed.names[1], bed.images[0]
    ours = _top(
        bed.server.url(f"/predict?task={name}&top_k=5"), image, {"Content-Type": "image/jpeg"}
    )
    theirs = _top(
        ray.url("/"), image, {"Content-Type": "image/jpeg", "serve_multiplexed_model_id": name}
    )
    return ours == theirs


def measure(bed: Bed, first: bool = False) -> dict:
    cfg, o = bed.config, bed.options
    folder = bed.workdir / f"full-{cfg.backbone}-{cfg.input_size}"
    started = time.perf_counter()
    copy_bytes = fixtures.write_full_models(folder, bed.backbone, o.n_tasks, cfg.input_size)
    meta = {
        "backbone": cfg.backbone,
        "num_features": bed.backbone.num_features,
        "n_labels": fixtures.N_LABELS,
        "input_size": cfg.input_size,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    out: dict = {
        "ray_version": _version("ray"),
        "litserve_version": _version("litserve"),
        "copy_file_bytes": copy_bytes,
        "write_s": time.perf_counter() - started,
        "max_models": o.peer_models,
    }
    common = [
        "--models",
        str(folder),
        "--batch",
        str(cfg.batch),
        "--threads",
        str(torch.get_num_threads()),
        "--device",
        bed.device,
    ]
    ray, out["ray"] = _start(
        bed, "bench.peers.ray_serve", [*common, "--max-models", str(o.peer_models)], "ray", "/"
    )
    lit, out["litserve"] = _start(
        bed, "bench.peers.litserve_single", [*common, "--task", bed.names[0]], "litserve", "/health"
    )
    out["same_answers"] = _same_answers(bed, ray)
    sides = {"ours100": (bed.server, bed.uniform(o.n_tasks))}
    if ray is not None:
        sides["ray100"] = (ray, _raw_chooser(bed, o.n_tasks))
    if lit is not None:
        sides["lit1"] = (lit, _multipart_chooser(bed, lambda n: "/predict", 1))
        sides["ours1"] = (
            bed.server,
            _multipart_chooser(bed, lambda n: f"/predict?task={n}&top_k=5", 1),
        )
    try:
        runs: dict = {side: [] for side in sides}
        names = list(sides)
        for r in range(o.repeats):
            for side in names[r % len(names) :] + names[: r % len(names)]:
                proc, choose = sides[side]
                runs[side].append(summary(bed.load(proc, choose, seed=r)))
        out["runs"] = runs
        out["rss_bytes"] = {"ours": bed.server.rss_bytes()}
        if ray is not None:
            out["rss_bytes"]["ray (all processes)"] = ray.rss_bytes(children=True)
        if lit is not None:
            out["rss_bytes"]["litserve (all processes)"] = lit.rss_bytes(children=True)
    finally:
        for proc in (ray, lit):
            if proc is not None:
                proc.stop()
    return out


CPU = "images_per_cpu_s"


def summarize(beds: dict) -> dict:
    figures, sides, setup = [], [], []
    for label, p in beds.items():
        runs = p.get("runs", {})
        for ours, peer, figure in (
            ("ours100", "ray100", "ours ÷ Ray Serve multiplex, 100 tasks, images per CPU-s"),
            ("ours1", "lit1", "ours ÷ LitServe, 1 task, images per CPU-s"),
        ):
            if ours in runs and peer in runs:
                value = ratios(rates(runs[ours], CPU), rates(runs[peer], CPU))
                figures.append({"figure": figure, "on": label, "value": value})
        rss = p.get("rss_bytes", {})
        rss_of = {
            "ours100": "ours",
            "ours1": "ours",
            "ray100": "ray (all processes)",
            "lit1": "litserve (all processes)",
        }
        for side, rs in runs.items():
            mem = rss.get(rss_of.get(side, ""))
            sides.append(
                [
                    side,
                    Spread.of(rates(rs)),
                    Spread.of(rates(rs, CPU)),
                    Spread.of([r["p50_ms"] for r in rs]),
                    Spread.of([r["p99_ms"] for r in rs]),
                    sum(r["requests"] for r in rs),
                    sum(sum(r["errors"].values()) for r in rs),
                    None if mem is None else mem / 1e6,
                ]
            )
        for peer, version, models in (
            ("ray", "ray_version", p["max_models"]),
            ("litserve", "litserve_version", 1),
        ):
            info = p.get(peer, {})
            error = (info.get("error") or "").strip().splitlines()[-1:]  # the exception's line
            started = info.get("startup_s", error[0] if error else None)
            setup.append([peer, p.get(version), started, p["copy_file_bytes"], models])
    return {"figures": figures, "tables": {"sides": sides, "setup": setup}}
