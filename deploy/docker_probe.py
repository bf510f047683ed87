"""The HTTP half of deploy/docker-check.sh: each subcommand checks one thing against the
running Compose stack (through nginx) and prints its figures; exit status 1 on failure.

    python deploy/docker_probe.py ready   --lb URL [--timeout S]
    python deploy/docker_probe.py seeded  --lb URL --tasks a,b [--timeout S]
    python deploy/docker_probe.py same    --lb URL --host URL --tasks a,b [--tol 1e-4]
    python deploy/docker_probe.py upload  --lb URL --token T --file F --docker CMD --containers A,B
    python deploy/docker_probe.py crash   --lb URL --task T --docker CMD --container ID

Plain httpx and the HTTP API (docs/serving.md), so that it runs in the project's venv on the host.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx


class CheckFailed(Exception):
    """One check did not hold; the message says which and with what figures."""


def say(text: str) -> None:
    print(f"[docker-check]   {text}", flush=True)


def test_image(seed: int = 0) -> bytes:
    """A deterministic 64x64 PNG (noise over a gradient): the same bytes on both sides."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    pixels = (ramp[None, :, None] * 0.5 + rng.uniform(0, 127, (64, 64, 3))).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def predict(http: httpx.Client, task: str, image: bytes) -> httpx.Response:
    return http.post(
        "/predict",
        params={"task": task, "top_k": 1000},
        content=image,
        headers={"Content-Type": "image/png"},
    )


def scores(response: httpx.Response) -> dict[str, float]:
    response.raise_for_status()
    (result,) = response.json()["results"]
    return {entry["label"]: entry["score"] for entry in result["top"]}


def wait_for(what: str, timeout: float, probe) -> float:
    """Calls probe() until it returns True; the seconds that took, or CheckFailed."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        try:
            if probe():
                return time.monotonic() - start
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise CheckFailed(f"{what}: not within {timeout:.0f} s (last error: {last!r})")


def check_ready(args) -> None:
    with httpx.Client(base_url=args.lb, timeout=5) as http:
        took = wait_for("/readyz through nginx", args.timeout, lambda: ready(http))
        answer = http.get("/readyz")
    say(f"/readyz through nginx: {answer.status_code} after {took:.1f} s, {answer.text.strip()}")


def ready(http: httpx.Client) -> bool:
    return http.get("/readyz").status_code == 200


def check_seeded(args) -> None:
    wanted = set(args.tasks.split(","))
    with httpx.Client(base_url=args.lb, timeout=5) as http:

        def seeded() -> bool:
            have = {t["name"] for t in http.get("/tasks").json()["tasks"]}
            return wanted <= have

        took = wait_for(f"demo tasks {sorted(wanted)} seeded", args.timeout, seeded)
    say(f"demo-seed: {len(wanted)} tasks registered through nginx after {took:.1f} s")


def check_same(args) -> None:
    """Every demo task answers the same probabilities in Docker as piggy-serve --demo here."""
    image = test_image()
    worst = 0.0
    with (
        httpx.Client(base_url=args.lb, timeout=60) as lb,
        httpx.Client(base_url=args.host, timeout=60) as host,
    ):
        for task in args.tasks.split(","):
            inside, outside = scores(predict(lb, task, image)), scores(predict(host, task, image))
            if inside.keys() != outside.keys():
                raise CheckFailed(f"{task}: labels differ: {sorted(inside)} vs {sorted(outside)}")
            diff = max(abs(inside[k] - outside[k]) for k in inside)
            top = max(inside, key=inside.get)
            say(
                f"{task}: {len(inside)} probabilities, top {top!r} {inside[top]:.4f}, "
                f"largest difference {diff:.2e}"
            )
            worst = max(worst, diff)
    if worst > args.tol:
        raise CheckFailed(f"predictions differ by {worst:.2e} > {args.tol}")
    say(f"predictions in Docker equal piggy-serve --demo outside it (max diff {worst:.2e})")


# Runs inside a replica (docker exec), so that each replica is asked on its own loopback:
# the wall-clock time at which it first lists the task, then first predicts with it.
POLLER = r"""
import base64, json, sys, time, urllib.error, urllib.request
name, image = sys.argv[1], base64.b64decode(sys.argv[2])
base = "http://127.0.0.1:8000"
def status(request):
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # refused, reset or timed out: not yet
        return 0
print("polling", flush=True)
deadline, seen = time.time() + 90, {}
for what in ("listed", "served"):
    while what not in seen and time.time() < deadline:
        request = base + "/tasks/" + name if what == "listed" else urllib.request.Request(
            base + "/predict?task=" + name, data=image, headers={"Content-Type": "image/png"})
        if status(request) == 200:
            seen[what] = time.time()
        else:
            time.sleep(0.01)
print(json.dumps(seen), flush=True)
"""


def check_upload(args) -> None:
    """An upload through nginx: each replica lists it within a second (and predicts with it)."""
    name = f"check-{uuid.uuid4().hex[:8]}"
    image = base64.b64encode(test_image(1)).decode()
    containers = args.containers.split(",")
    if len(containers) < 2:
        raise CheckFailed(f"want 2 replicas, have {containers}")
    with open(args.file, "rb") as f:
        artifact = f.read()
    auth = {"Authorization": f"Bearer {args.token}"}
    pollers = [
        subprocess.Popen(
            [*shlex.split(args.docker), "exec", c, "python", "-c", POLLER, name, image],
            stdout=subprocess.PIPE,
            text=True,
        )
        for c in containers
    ]
    try:
        for poller in pollers:
            poller.stdout.readline()  # "polling": it asks before the upload exists
        with httpx.Client(base_url=args.lb, timeout=30) as http:
            put = http.put(
                f"/tasks/{name}",
                content=artifact,
                headers={**auth, "Content-Type": "application/octet-stream"},
            )
            uploaded = time.time()
            if put.status_code != 201:
                raise CheckFailed(f"PUT /tasks/{name}: {put.status_code} {put.text}")
            seen = [json.loads(p.communicate(timeout=180)[0]) for p in pollers]
            warm = sorted(timed(lambda: predict(http, name, test_image(1))) for _ in range(6))
            http.delete(f"/tasks/{name}", headers=auth)
    finally:
        for poller in pollers:
            poller.kill()
    for what, verb in (("listed", "lists"), ("served", "predicts with")):
        figures = ", ".join(
            f"{c[:12]} {(s[what] - uploaded) * 1000:.0f} ms" if what in s else f"{c[:12]} never"
            for c, s in zip(containers, seen, strict=True)
        )
        say(
            f"after the upload's 201 through nginx (< 0: before it), each replica {verb} {name}: "
            f"{figures}"
        )
    say(f"then, through nginx, a prediction with it takes {warm[3] * 1000:.0f} ms (median of 6)")
    # docs/compose.md: every replica sees an upload within a second. The first prediction also
    # builds the task's patch on the replica: reported, and it must come at all.
    listed = max(s.get("listed", float("inf")) - uploaded for s in seen)
    if listed > args.within:
        raise CheckFailed(f"a replica listed the upload after {listed:.2f} s > {args.within} s")
    if not all("served" in s for s in seen):
        raise CheckFailed("a replica did not predict with the upload within 90 s")


def timed(call) -> float:
    start = time.monotonic()
    call().raise_for_status()
    return time.monotonic() - start


def check_crash(args) -> None:
    """SIGKILL one replica: nginx keeps answering, the restart policy brings it back.

    The replica's process is killed from the host, as the kernel's OOM killer or a crash
    would end it: `docker kill` counts as a manual stop, which no restart policy undoes
    (Docker's documented rule, also seen here with Docker 20.10)."""
    docker = shlex.split(args.docker)
    image = test_image(2)
    log: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=args.lb, timeout=30) as http:
            while not stop.is_set():
                try:
                    status = predict(http, args.task, image).status_code
                except httpx.HTTPError:
                    status = 0
                log.append((time.monotonic(), status))
                time.sleep(0.05)

    before = inspect(docker, args.container)
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(1)
        killed = time.monotonic()
        os.kill(before["Pid"], signal.SIGKILL)
        back = wait_restarted(docker, args.container, before["RestartCount"], 180)
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    during = [(t, s) for t, s in log if t >= killed]
    bad = [f"{s} at +{t - killed:.1f} s" for t, s in during if s != 200]
    gaps = [b - a for (a, _), (b, _) in zip(during, during[1:], strict=False)]
    restarts = f"RestartCount {before['RestartCount']} -> {back['count']}"
    say(
        f"replica {args.container[:12]} SIGKILLed: restarted by its policy ({restarts}), "
        f"running again after {back['running'] - killed:.1f} s, "
        f"healthy after {back['healthy'] - killed:.1f} s"
    )
    say(
        f"through nginx meanwhile: {len(during)} predictions, {len(bad)} not 200 {bad[:5]}, "
        f"longest gap between answers {max(gaps, default=0):.2f} s"
    )
    # One request may be lost: seen in 1 of 2 runs here (a 502), although nginx retries a
    # failed one on the other replica; presumably the one in flight when the replica died.
    if len(bad) > 1 or max(gaps, default=0) > 30:
        raise CheckFailed("nginx did not keep answering while a replica was down")


def inspect(docker: list[str], container: str) -> dict:
    out = subprocess.run(
        [*docker, "inspect", "--format", "{{json .}}", container],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out)
    state = data["State"]
    return {
        "RestartCount": data["RestartCount"],
        "Pid": state["Pid"],
        "Running": state["Running"],
        "Health": state.get("Health", {}).get("Status"),
    }


def wait_restarted(docker: list[str], container: str, count: int, timeout: float) -> dict:
    start = time.monotonic()
    running = None
    while time.monotonic() - start < timeout:
        now = inspect(docker, container)
        if now["RestartCount"] > count and now["Running"] and running is None:
            running = time.monotonic()
        if running is not None and now["Health"] == "healthy":
            return {"count": now["RestartCount"], "running": running, "healthy": time.monotonic()}
        time.sleep(0.5)
    raise CheckFailed(f"{container} was not restarted and healthy within {timeout:.0f} s: {now}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    for name, run in (
        ("ready", check_ready),
        ("seeded", check_seeded),
        ("same", check_same),
        ("upload", check_upload),
        ("crash", check_crash),
    ):
        s = sub.add_parser(name)
        s.set_defaults(run=run)
        s.add_argument("--lb", required=True, help="the load balancer's URL")
        s.add_argument("--timeout", type=float, default=300)
        s.add_argument("--tasks", default="")
        s.add_argument("--task", default="")
        s.add_argument("--host", help="piggy-serve --demo outside Docker")
        s.add_argument("--tol", type=float, default=1e-4)
        s.add_argument("--token")
        s.add_argument("--file")
        s.add_argument("--within", type=float, default=1.0)
        s.add_argument("--docker", default="docker")
        s.add_argument("--container")
        s.add_argument("--containers", default="", help="comma-separated container ids")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except CheckFailed as exc:
        print(f"[docker-check] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
