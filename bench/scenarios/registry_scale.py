"""The server against the size of its registry: start-up, memory and open files with 0,
1,000 and 10,000 registered tasks; the same 10,000 under `ulimit -n 1024`; a task's first
request (its state built) against its second at 224 px; the host tier of task states,
and that tier evicting under a budget of ~10 states while 50 tasks are used in turn.

The demo backbone (efficientnet_lite0, its real weights), a folder registry, one engine
worker. The tasks are the four bundled demo artifacts, copied: each copy gets its own name
(metadata `task`), its own head (the head's float32 bytes replaced in place, at the
offsets the safetensors header gives) and, for the 224 px tasks, metadata `input_size`
"224" (the masks and the head do not depend on the input size). Only the header and the
head are rewritten, so 10,000 files take seconds; a sample of them is read back with
`artifact.load` before any server starts. The registries live in the run's scratch folder
and go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import time
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import psutil

from bench import fixtures, procs
from bench.stats import Spread, ratios
from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks import demo
from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.server.catalog import Catalog, parse_header
from piggyback_serve.server.registry.dir import DirRegistry

BACKBONE = "efficientnet_lite0"
DEMO = demo.BUNDLED_DIR
FULL = {
    "counts": (0, 1000, 10000),
    "repeats": 2,
    "sample": 50,
    "cold": 20,
    "evict_tasks": 50,
    "rounds": 3,
}
QUICK = {
    "counts": (0, 50, 200),
    "repeats": 1,
    "sample": 10,
    "cold": 4,
    "evict_tasks": 12,
    "rounds": 2,
}
HELD = 10  # states the evicting run's host budget holds (~)
NOFILE = 1024
CHECKED = 20  # generated files read back with artifact.load (and the first of each base)
READY_TIMEOUT_S = 300


def measure(ctx) -> dict:
    plan = QUICK if ctx.options.quick else FULL
    root = ctx.workdir / "registry_scale"
    root.mkdir(exist_ok=True)
    bases = [p.read_bytes() for p in sorted(DEMO.glob("*.safetensors"))]
    counts = plan["counts"]

    started = time.perf_counter()
    pool = root / f"tasks-{max(counts)}"
    names = write_tasks(pool, bases, max(counts), seed=0)
    write_s = time.perf_counter() - started
    checked = check_tasks(pool, names, CHECKED)
    sizes = [(pool / f"{n}.safetensors").stat().st_size for n in names]

    out: dict = {
        "backbone": BACKBONE,
        "write_s": write_s,
        "checked": checked,
        "mean_artifact_bytes": statistics.fmean(sizes),
        "scale": [],
    }
    image64 = fixtures.jpegs(64, 1)[0]
    for repeat in range(plan["repeats"]):  # the counts in turn, each start a fresh server
        for count in counts:
            folder = pool if count == max(counts) else linked(root, pool, names[:count])
            row = startup(ctx, folder, count, tag=f"scale-{count}-{repeat}")
            out["scale"].append({**row, "repeat": repeat})
    out["listing"] = listing(pool)
    out["nofile"] = under_nofile(ctx, pool, names, plan["sample"], image64)

    cold_names = [f"c{i:03d}" for i in range(plan["cold"] + 1)]  # c000 warms the server
    cold_dir = root / "cold-224"
    write_tasks(cold_dir, bases, len(cold_names), seed=1, names=cold_names, input_size=224)
    check_tasks(cold_dir, cold_names, len(cold_names))
    out["cold"] = cold_warm(ctx, cold_dir, cold_names, fixtures.jpegs(224, 1)[0])

    host = out["cold"]["tiers"].get("host", {})
    state_bytes = host["bytes"] / host["tasks"] if host.get("tasks") else 0
    evict_dir = linked(root, pool, names[: plan["evict_tasks"]], tag="evict")
    out["evict"] = evicting(
        ctx, evict_dir, names[: plan["evict_tasks"]], plan["rounds"], state_bytes, image64
    )
    return out


# ---------------------------------------------------------------------------------------
# Tasks


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the writer pads the header to 8 bytes too
    return len(raw).to_bytes(8, "little") + raw + body


def variant(base: bytes, name: str, rng: np.random.Generator, input_size: int | None) -> bytes:
    """`base` under another name, with its own head (the base's, each weight scaled by
    1 ± ~5%) and, when given, another input size; nothing else is touched."""
    header, body = _split(base)
    meta = dict(header["__metadata__"], task=name)
    if input_size is not None:
        meta["input_size"] = str(input_size)
    header = dict(header, __metadata__=meta)
    begin, end = header["head.weight"]["data_offsets"]
    head = np.frombuffer(body, dtype="<f4", count=(end - begin) // 4, offset=begin)
    head = head * (1 + 0.05 * rng.standard_normal(head.size, dtype=np.float32))
    body = body[:begin] + head.astype("<f4").tobytes() + body[end:]
    return _join(header, body)


def write_tasks(
    folder: Path,
    bases: list[bytes],
    n: int,
    seed: int,
    names: list[str] | None = None,
    input_size: int | None = None,
) -> list[str]:
    """`n` tasks NAME.safetensors in `folder`, the bases in turn; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [fixtures.task_name(i) for i in range(n)]
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        (folder / f"{name}.safetensors").write_bytes(
            variant(bases[i % len(bases)], name, rng, input_size)
        )
    return names


def check_tasks(folder: Path, names: list[str], n: int) -> int:
    """Read back the first file of each base and a random sample, checked against the
    backbone as the server checks them; how many."""
    if not names:
        return 0
    backbone = load_backbone(BACKBONE)
    picked = list(dict.fromkeys(names[:4] + random.Random(0).sample(names, min(n, len(names)))))
    for name in picked:
        art = artifacts.load(folder / f"{name}.safetensors", backbone)
        assert art.task == name, (art.task, name)
    return len(picked)


def linked(root: Path, pool: Path, names: list[str], tag: str = "") -> Path:
    """A registry folder holding `names` from `pool`, as hard links (real files to the
    server: no symlink to follow)."""
    folder = root / f"tasks-{tag or len(names)}"
    folder.mkdir(exist_ok=True)
    for name in names:
        link = folder / f"{name}.safetensors"
        if not link.exists():
            os.link(pool / f"{name}.safetensors", link)
    return folder


# ---------------------------------------------------------------------------------------
# The server


class _Limited(procs.Proc):
    """procs.Proc with its argv run under `prlimit --nofile=NOFILE:NOFILE` (prlimit execs
    it: the pid is the server's)."""

    def __init__(self, argv, env, log, port):
        limit = f"--nofile={NOFILE}:{NOFILE}"
        super().__init__(["prlimit", limit, "--", *argv], env, log, port)


def start(ctx, folder: Path, tag: str, env: dict[str, str] | None = None, limited=False):
    """piggy-serve on `folder` with one engine worker (start_ours: the bench's server)."""
    with mock.patch.object(procs, "Proc", _Limited if limited else procs.Proc):
        return procs.start_ours(
            ctx.workdir,
            folder,
            BACKBONE,
            None,
            8,
            tag=tag,
            extra_env={"PIGGY_DEVICE": ctx.device, "PIGGY_ENGINE_WORKERS": "1", **(env or {})},
        )


def tree(proc: procs.Proc) -> list[psutil.Process]:
    leader = psutil.Process(proc.popen.pid)
    return [leader, *leader.children(recursive=True)]


def footprint(proc: procs.Proc) -> dict:
    """RSS, PSS and open descriptors of every process of the server (the server, its
    engine worker and whatever else it started: torch's shm manager, multiprocessing's
    forkserver and resource tracker). Summed RSS counts pages the processes share once
    per process; PSS splits them."""
    rss = pss = fds = n = 0
    for p in tree(proc):
        with contextlib.suppress(psutil.Error):
            mem = p.memory_full_info()
            rss += mem.rss
            pss += mem.pss
            fds += p.num_fds()
            n += 1
    return {"rss_bytes": rss, "pss_bytes": pss, "fds": fds, "processes": n}


def ready(client: httpx.Client) -> dict:
    r = client.get("/readyz")
    r.raise_for_status()
    return r.json()


def startup(ctx, folder: Path, count: int, tag: str) -> dict:
    proc = start(ctx, folder, tag)
    try:
        ready_s = proc.wait_ready("/readyz", READY_TIMEOUT_S)
        time.sleep(1.0)  # let the workers settle before taking the footprint
        with httpx.Client(base_url=proc.url(""), timeout=30) as client:
            health = ready(client)
        return {
            "tasks": count,
            "ready_s": ready_s,
            "listed": health["tasks"],
            "loaded": health["tasks_loaded"],
            "failed": health["tasks_failed"],
            **footprint(proc),
        }
    finally:
        proc.stop()


def predict(client: httpx.Client, name: str, image: bytes) -> tuple[int, float]:
    """(status, ms) of one /predict of `image` with task `name`."""
    t0 = time.perf_counter()
    r = client.post(
        "/predict", params={"task": name}, content=image, headers={"content-type": "image/jpeg"}
    )
    return r.status_code, 1e3 * (time.perf_counter() - t0)


def tiers(client: httpx.Client) -> dict[str, dict]:
    """/metrics' piggy_tier_* per tier: tasks, bytes, budget, hits, misses, evictions."""
    found: dict[str, dict] = {}
    keys = {
        "piggy_tier_tasks": "tasks",
        "piggy_tier_bytes": "bytes",
        "piggy_tier_budget_bytes": "budget",
        "piggy_tier_hits_total": "hits",
        "piggy_tier_misses_total": "misses",
        "piggy_tier_evictions_total": "evictions",
    }
    for line in client.get("/metrics").text.splitlines():
        match = re.fullmatch(r'(piggy_tier_\w+)\{tier="(\w+)"\} (\S+)', line)
        if match and match[1] in keys:
            found.setdefault(match[2], {})[keys[match[1]]] = int(float(match[3]))
    return found


def listing(folder: Path) -> dict:
    """The listing phase of start-up alone, in this process: the folder's index, then
    Catalog.refresh (every task's header read and checked), then the headers parsed and
    checked without the catalog (the share of the refresh that is not I/O and hops)."""
    backbone = load_backbone(BACKBONE)
    registry = DirRegistry(folder)
    out = {}

    async def run() -> None:
        t0 = time.perf_counter()
        entries = await registry.list()
        out["index_s"] = time.perf_counter() - t0
        catalog = Catalog(registry, backbone, prepare=lambda art: None)
        t0, c0 = time.perf_counter(), time.process_time()
        await catalog.refresh()
        out["refresh_s"] = time.perf_counter() - t0
        out["refresh_cpu_s"] = time.process_time() - c0
        out["listed"] = len(catalog.tasks)
        heads = [registry._read_header(name)[0] for name in entries]
        c0 = time.process_time()
        for data in heads:
            parse_header(data, backbone)
        out["parse_cpu_s"] = time.process_time() - c0

    asyncio.run(run())
    return out


def under_nofile(ctx, folder: Path, names: list[str], sample: int, image: bytes) -> dict:
    """Every task of `folder` under `ulimit -n NOFILE`: listed, and a random sample answers."""
    proc = start(ctx, folder, "nofile", limited=True)
    try:
        ready_s = proc.wait_ready("/readyz", READY_TIMEOUT_S)
        limit = psutil.Process(proc.popen.pid).rlimit(psutil.RLIMIT_NOFILE)
        with httpx.Client(base_url=proc.url(""), timeout=60) as client:
            health = ready(client)
            at_ready = footprint(proc)
            picked = random.Random(1).sample(names, min(sample, len(names)))
            statuses = [predict(client, name, image)[0] for name in picked]
            after = ready(client)
            return {
                "tasks": len(names),
                "nofile": list(limit),
                "ready_s": ready_s,
                "listed": health["tasks"],
                "failed": after["tasks_failed"],
                "fds_ready": at_ready["fds"],
                "fds_after": footprint(proc)["fds"],
                "sampled": len(picked),
                "answered": sum(s == 200 for s in statuses),
                "statuses": statuses,
                "loaded_after": after["tasks_loaded"],
            }
    finally:
        proc.stop()


def cold_warm(ctx, folder: Path, names: list[str], image: bytes) -> dict:
    """Each task's first /predict (its state built) and second (from the tier); the first
    task only warms the server (its first forward at this size) and is left out."""
    proc = start(ctx, folder, "cold")
    try:
        ready_s = proc.wait_ready("/readyz", READY_TIMEOUT_S)
        first, second, statuses = [], [], []
        with httpx.Client(base_url=proc.url(""), timeout=60) as client:
            for i, name in enumerate(names):
                (s1, ms1), (s2, ms2) = predict(client, name, image), predict(client, name, image)
                if i:
                    first.append(ms1)
                    second.append(ms2)
                    statuses += [s1, s2]
            return {
                "input_size": 224,
                "ready_s": ready_s,
                "first_ms": first,
                "second_ms": second,
                "statuses": statuses,
                "tiers": tiers(client),
            }
    finally:
        proc.stop()


def evicting(
    ctx, folder: Path, names: list[str], rounds: int, state_bytes: float, image: bytes
) -> dict:
    """`names` in turn, `rounds` times, with a host budget of ~HELD states."""
    if not state_bytes:
        raise RuntimeError("no state size from the cold run: no budget to set")
    budget = int((HELD + 0.5) * state_bytes)
    proc = start(ctx, folder, "evict", env={"PIGGY_HOST_STATE_BYTES": str(budget)})
    try:
        proc.wait_ready("/readyz", READY_TIMEOUT_S)
        statuses, ms = [], []
        with httpx.Client(base_url=proc.url(""), timeout=60) as client:
            for _ in range(rounds):
                for name in names:
                    status, took = predict(client, name, image)
                    statuses.append(status)
                    ms.append(took)
            return {
                "tasks": len(names),
                "held": HELD,
                "state_bytes": state_bytes,
                "budget": budget,
                "statuses": statuses,
                "ms": ms,
                "loaded": ready(client)["tasks_loaded"],
                "tiers": tiers(client),
            }
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------
# Figures and tables


def _on(raw: dict, tasks: int) -> str:
    return f"{raw['backbone']}, {tasks:,} tasks"


def summarize(raw: dict) -> dict:
    counts = list(dict.fromkeys(r["tasks"] for r in raw["scale"]))
    by_count = {c: [r for r in raw["scale"] if r["tasks"] == c] for c in counts}
    zeros, mosts = by_count[counts[0]], by_count[counts[-1]]  # repeat i of each, in step
    mean_bytes = raw["mean_artifact_bytes"]

    def per_task(rows: list[dict]) -> Spread | None:
        if not rows[0]["tasks"]:
            return None
        growth = [r["rss_bytes"] - z["rss_bytes"] for r, z in zip(rows, zeros, strict=True)]
        return Spread.of([g / rows[0]["tasks"] / mean_bytes for g in growth])

    def spread(rows: list[dict], key: str, scale: float = 1.0) -> Spread:
        return Spread.of([r[key] / scale for r in rows])

    most = mosts[0]["tasks"]
    figures = [
        {
            "figure": "open descriptors of the serving tree, N tasks ÷ 0 tasks",
            "on": _on(raw, most),
            "value": ratios([r["fds"] for r in mosts], [z["fds"] for z in zeros]),
        },
        {
            "figure": "ready after start, N tasks, s",
            "on": _on(raw, most),
            "value": spread(mosts, "ready_s"),
        },
        {
            "figure": "serving-tree RSS per registered, unused task ÷ its file bytes",
            "on": _on(raw, most),
            "value": per_task(mosts),
        },
    ]
    tables: dict[str, list] = {
        "setup": [[most, raw["write_s"], raw["mean_artifact_bytes"], raw["checked"]]],
        "startup": [
            [
                c,
                spread(rows, "ready_s"),
                rows[-1]["listed"],
                max(r["failed"] for r in rows),
                spread(rows, "rss_bytes", 1e6),
                spread(rows, "pss_bytes", 1e6),
                spread(rows, "fds"),
                rows[-1]["processes"],
                per_task(rows),
            ]
            for c, rows in by_count.items()
        ],
    }
    zero_s = statistics.median(r["ready_s"] for r in zeros)
    most_s = statistics.median(r["ready_s"] for r in mosts)
    li = raw.get("listing")
    if li:
        tables["phases"] = [
            ["ready, 0 tasks (imports, backbone, engine worker), median", zero_s, None],
            [f"ready, {most:,} tasks − ready, 0 tasks, medians", most_s - zero_s, None],
            [f"folder index, {li['listed']:,} tasks, in process", li["index_s"], None],
            [
                f"Catalog.refresh, {li['listed']:,} tasks, in process",
                li["refresh_s"],
                li["refresh_cpu_s"],
            ],
            [
                f"headers parsed and checked, {li['listed']:,} tasks, in process",
                None,
                li["parse_cpu_s"],
            ],
        ]
    n = raw.get("nofile")
    if n:
        figures += [
            {
                "figure": "tasks listed under ulimit -n 1024 ÷ registered",
                "on": _on(raw, n["tasks"]),
                "value": n["listed"] / n["tasks"],
            },
            {
                "figure": "sampled tasks answering 200 under ulimit -n 1024 ÷ sampled",
                "on": f"{n['sampled']} of {n['tasks']:,} tasks",
                "value": n["answered"] / n["sampled"] if n["sampled"] else None,
            },
        ]
        tables["nofile"] = [
            [
                n["tasks"],
                "/".join(str(v) for v in n["nofile"]),
                n["ready_s"],
                n["listed"],
                n["failed"],
                n["fds_ready"],
                n["sampled"],
                n["answered"],
                n["fds_after"],
            ]
        ]
    tier_rows = []
    c = raw.get("cold")
    if c:
        first, second = statistics.median(c["first_ms"]), statistics.median(c["second_ms"])
        figures.append(
            {
                "figure": "first request ÷ second, fresh tasks, 224 px, medians",
                "on": f"{raw['backbone']}, {len(c['first_ms'])} tasks",
                "value": first / second,
            }
        )
        tables["cold"] = [
            [
                len(c["first_ms"]),
                c["input_size"],
                first,
                max(c["first_ms"]),
                second,
                max(c["second_ms"]),
                first / second,
                sum(s != 200 for s in c["statuses"]),
            ]
        ]
        tier_rows += [["first and second requests", t, *_tier(v)] for t, v in c["tiers"].items()]
    e = raw.get("evict")
    if e:
        ok = sum(s == 200 for s in e["statuses"])
        figures.append(
            {
                "figure": "requests answered 200 ÷ sent, host tier over budget, tasks in turn",
                "on": f"{e['tasks']} tasks, budget ~{e['held']} states",
                "value": ok / len(e["statuses"]),
            }
        )
        host = e["tiers"].get("host", {})
        tables["evict"] = [
            [
                e["tasks"],
                e["held"],
                e["budget"],
                len(e["statuses"]),
                ok,
                host.get("tasks"),
                host.get("evictions"),
                statistics.median(e["ms"]),
                max(e["ms"]),
            ]
        ]
        tier_rows += [["tasks in turn, over budget", t, *_tier(v)] for t, v in e["tiers"].items()]
    if tier_rows:
        tables["tiers"] = tier_rows
    return {"figures": figures, "tables": tables}


def _tier(t: dict) -> list:
    return [t.get(k) for k in ("tasks", "bytes", "budget", "hits", "misses", "evictions")]
