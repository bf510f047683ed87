"""Upload the demo tasks baked into the image to the cluster, once: a task name that is
already registered is left alone (an operator's own upload under that name wins).

Run by the compose service `demo-seed`: python deploy/seed_demo.py FOLDER
($PIGGY_URL: the load balancer; $PIGGY_TOKEN: the admin token). Plain HTTP, the
HTTP API (docs/serving.md) only, so that it depends on nothing but httpx.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx

WAIT_S = 300


def wait_ready(http: httpx.Client) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"demo-seed: {http.base_url} not ready after {WAIT_S}s")
        time.sleep(2)


def main(folder: str) -> int:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        print(f"demo-seed: no demo tasks in {folder}", file=sys.stderr)
        return 1
    url = os.environ.get("PIGGY_URL", "http://127.0.0.1:8000")
    token = os.environ.get("PIGGY_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    failed = 0
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        wait_ready(http)
        have = {task["name"] for task in http.get("/tasks").raise_for_status().json()["tasks"]}
        for path in files:
            name = path.stem
            if name in have:
                print(f"demo-seed: {name} already registered, left alone")
                continue
            r = http.put(
                f"/tasks/{name}",
                content=path.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
            if r.status_code == 201:
                print(f"demo-seed: uploaded {name}")
            else:  # e.g. 422 when PIGGY_BACKBONE is not the demo's backbone
                print(f"demo-seed: {name} not uploaded: {r.status_code} {r.text}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/opt/piggy/demo-tasks"))
