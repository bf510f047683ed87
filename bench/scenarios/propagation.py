"""Time from an upload on replica A to the first correct prediction on replica B.

Starts a private redis-server and two `piggy-serve` replicas with docker-compose.yml's
replica environment (small resnet18 backbone, random weights, 32 px artifacts), then
uploads N times and polls B with /predict until it answers with the new artifact's
offline prediction. Two cases:

- new: each upload is a new task name (B also rescans when it misses a name);
- replace: the same name re-uploaded with other weights (B already serves the old ones,
  so only the Redis notice can tell it: the pub/sub path alone).
Timed from the PUT's 201 on A to B's first /predict answering the new artifact's offline
top-3 (scores within 1e-5).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.stats import percentile
from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from tests.redis.compose_env import replica
from tests.redis.redis_support import RedisServer, free_port
from tests.redis.redis_support import replica as start_replica
from tests.server.server_support import Reference, make_artifact, png

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/octet-stream"}
VARIABLES = {
    "PIGGY_ADMIN_TOKEN": TOKEN,
    "PIGGY_BACKBONE": "resnet18",
    "PIGGY_BACKBONE_WEIGHTS": "random",
}
IMAGE = png(4242)
GIVE_UP_S = 10.0


def measure(ctx) -> dict:
    uploads = 3 if ctx.options.quick else 20

    backbone = load_backbone("resnet18", "random")
    blobs, tops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(2):
            art = make_artifact(backbone, f"v{seed}", n_labels=5 + seed, seed=900 + seed)
            blobs.append(artifacts.write(art, Path(tmp) / f"v{seed}.safetensors").read_bytes())
        reference = Reference(backbone, {})
        for seed, blob in enumerate(blobs):
            reference.artifacts[f"v{seed}"] = artifacts.load(blob, backbone)
            tops.append(reference.probs(f"v{seed}", IMAGE).topk(3))

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        redis = RedisServer(tmp / "redis")
        redis.start()
        stack.callback(redis.kill)
        command, env = replica(VARIABLES)
        beside = Path(sys.executable).with_name(command[0])  # the venv's, activated or not
        argv = [str(beside) if beside.exists() else shutil.which(command[0]) or command[0]]
        argv += command[1:]
        clients = []
        for name in "ab":
            port = free_port()
            (tmp / name).mkdir()
            own = dict(env, PIGGY_HOST="127.0.0.1", PIGGY_PORT=str(port), PIGGY_REGISTRY=redis.url)
            own["PIGGY_GRPC_PORT"] = "0"  # compose's 8001 is per container; here one host
            own["PIGGY_HOME"] = str(tmp / name / "home")
            clients.append(stack.enter_context(start_replica(tmp / name / "log", argv, own, port)))
        a, b = clients

        def correct(task: str, which: int) -> bool:
            r = b.post(
                f"/predict?task={task}&top_k=3",
                content=IMAGE,
                headers={"content-type": "image/png"},
            )
            if r.status_code != 200:
                return False
            top = r.json()["results"][0]["top"]
            scores, indices = tops[which]
            labels = reference.artifacts[f"v{which}"].labels
            return [t["label"] for t in top] == [labels[i] for i in indices] and all(
                abs(t["score"] - s) < 1e-5 for t, s in zip(top, scores.tolist(), strict=True)
            )

        def knows(task: str, which: int) -> bool:
            # GET /tasks/NAME of a name B knows reads B's catalog only (no rescan): the
            # label count tells the two artifacts apart.
            r = b.get(f"/tasks/{task}")
            return r.status_code == 200 and len(r.json()["labels"]) == 5 + which

        def upload_then_poll(task: str, which: int) -> tuple[float, float]:
            r = a.put(f"/tasks/{task}", content=blobs[which], headers=AUTH)
            assert r.status_code == 201, r.text
            started = time.perf_counter()
            times = []
            for check in (knows, correct):
                while not check(task, which):
                    if time.perf_counter() - started > GIVE_UP_S:
                        raise TimeoutError(f"{task}: B not correct after {GIVE_UP_S}s")
                times.append(time.perf_counter() - started)
            return times[0], times[1]

        results = {"new": [], "replace": []}
        upload_then_poll("replaced", 0)
        for i in range(uploads):
            results["new"].append(upload_then_poll(f"new{i}", i % 2))
            results["replace"].append(upload_then_poll("replaced", (i + 1) % 2))

    return results


def summarize(results: dict) -> dict:
    figures, rows = [], []
    for case, pairs in results.items():
        known = sorted(k * 1000 for k, _ in pairs)
        ms = sorted(c * 1000 for _, c in pairs)
        rows.append(
            [
                case,
                len(ms),
                statistics.median(known),
                known[-1],
                statistics.median(ms),
                percentile(ms, 90),
                ms[-1],
            ]
        )
        figures.append(
            {
                "figure": "upload → first correct prediction on another replica, median ms",
                "on": case,
                "value": statistics.median(ms),
            }
        )
    return {"figures": figures, "tables": {"cases": rows}}
