"""What a task costs: bytes on disk and in Redis; the server's memory and start-up time with
N registered tasks (Redis and N tasks on the first bed only)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time

from bench import fixtures, procs
from bench.bed import Bed

N_REDIS = 10


def measure(bed: Bed, first: bool = False) -> dict:
    out = {"bytes": bytes_on_disk(bed)}
    if first:
        out["redis"] = redis_bytes(bed)
        out["scale"] = scale(bed)
    return out


def summarize(beds: dict) -> dict:
    figures, on_disk, redis, scaled = [], [], [], []
    for label, c in beds.items():
        b = c["bytes"]
        figures.append(
            {
                "figure": "task file ÷ ideal (1 bit per masked weight + head)",
                "on": label,
                "value": b["ratio"],
            }
        )
        on_disk.append(
            [
                b["backbone"],
                b["maskable_weights"],
                b["ideal_bytes"],
                b["file_bytes"],
                b["ratio"],
                b["full_copy_bytes"],
            ]
        )
        r = c.get("redis")
        if r and "error" not in r:
            redis.append(
                [
                    b["backbone"],
                    r["task_key_bytes"],
                    r["used_memory_per_task"],
                    r["ratio_key"],
                    r["ratio_used_memory"],
                ]
            )
        if c.get("scale"):
            rows = c["scale"]["rows"]
            for row in rows:
                per = (
                    (row["rss_bytes"] - rows[0]["rss_bytes"]) / row["tasks"]
                    if row["tasks"]
                    else None
                )
                scaled.append(
                    [
                        b["backbone"],
                        row["tasks"],
                        row["startup_s"],
                        row["rss_bytes"] / 1e6,
                        None if per is None else per / 1e3,
                    ]
                )
    tables = {"bytes": on_disk, "redis": redis, "scale": scaled}
    return {"figures": figures, "tables": tables}


def bytes_on_disk(bed: Bed) -> dict:
    sizes = [(bed.registry / f"{n}.safetensors").stat().st_size for n in bed.names]
    ideal = fixtures.ideal_task_bytes(bed.backbone)
    return {
        "backbone": bed.config.backbone,
        "maskable_weights": sum(w.numel() for w in bed.backbone.maskable().values()),
        "labels": fixtures.N_LABELS,
        "ideal_bytes": ideal,
        "file_bytes": max(sizes),
        "ratio": max(sizes) / ideal,
        "full_copy_bytes": bed.params_bytes,
    }


def redis_bytes(bed: Bed) -> dict:
    """Memory Redis spends per task, stored through our own Redis registry backend."""
    from piggyback_serve.server.registry.redis import RedisRegistry

    port = procs.free_port()
    try:
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return {"error": "redis-server is not installed"}
    try:
        return asyncio.run(_redis_measure(RedisRegistry(f"redis://127.0.0.1:{port}/0"), bed))
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)


async def _redis_measure(registry, bed: Bed) -> dict:
    client = registry._client
    for _ in range(100):
        try:
            await client.ping()
            break
        except Exception:  # noqa: BLE001 - still starting
            await asyncio.sleep(0.05)
    before = (await client.info("memory"))["used_memory"]
    for name in bed.names[:N_REDIS]:
        await registry.put(name, (bed.registry / f"{name}.safetensors").read_bytes())
    after = (await client.info("memory"))["used_memory"]
    key_bytes = await client.memory_usage(registry._task_key(bed.names[0]), samples=0)
    await registry.close()
    ideal = fixtures.ideal_task_bytes(bed.backbone)
    per_task = (after - before) / N_REDIS
    return {
        "task_key_bytes": key_bytes,
        "used_memory_per_task": per_task,
        "ratio_key": key_bytes / ideal,
        "ratio_used_memory": per_task / ideal,
    }


def scale(bed: Bed) -> dict:
    """RSS and start-up time of the server with 0, 10, 100, 1,000 registered tasks."""
    counts = bed.options.scale_counts
    pool = bed.workdir / f"scale-{bed.config.backbone}"
    started = time.perf_counter()
    names = fixtures.write_registry(pool, bed.backbone, max(counts), bed.config.input_size)
    write_s = time.perf_counter() - started
    rows = []
    for count in (0, *counts):
        folder = bed.workdir / f"scale-{bed.config.backbone}-{count}"
        folder.mkdir(exist_ok=True)
        for name in names[:count]:
            link = folder / f"{name}.safetensors"
            if not link.exists():
                link.symlink_to(pool / f"{name}.safetensors")
        server = procs.start_ours(
            bed.workdir,
            folder,
            bed.config.backbone,
            bed.config.weights,
            bed.config.batch,
            tag=f"scale-{count}",
            extra_env={"PIGGY_DEVICE": bed.device},
        )
        try:
            ready_s = server.wait_ready("/readyz", 600)
            time.sleep(0.5)
            rows.append(
                {
                    "tasks": count,
                    "startup_s": ready_s,
                    "rss_bytes": server.rss_bytes(),
                    "cuda_bytes": cuda_bytes(server.popen.pid)
                    if bed.device.startswith("cuda")
                    else None,
                }
            )
        finally:
            server.stop()
    return {"rows": rows, "write_s": write_s}


def cuda_bytes(pid: int) -> int | None:
    """GPU memory a process holds, from nvidia-smi (None when it can't tell)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        p, mib = (x.strip() for x in line.split(","))
        if p == str(pid):
            return int(mib) * 1024 * 1024
    return None
