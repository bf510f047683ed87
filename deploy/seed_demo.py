"""Upload the demo tasks baked into the image to the cluster, once: a task name that is
already registered is left alone (an operator's own upload under that name wins).

Run by the compose service `demo-seed`: python deploy/seed_demo.py FOLDER
($PIGGY_URL: the load balancer; $PIGGY_TOKEN: the admin token).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from client.client import Client
from client.errors import PiggyError

WAIT_S = 300


def wait_ready(client: Client) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            client.health()
            return
        except (PiggyError, httpx.TransportError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo-seed: cluster not ready after {WAIT_S}s: {exc}") from exc
            time.sleep(2)


def main(folder: str) -> int:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        print(f"demo-seed: no demo tasks in {folder}", file=sys.stderr)
        return 1
    with Client() as client:
        wait_ready(client)
        have = {task["name"] for task in client.tasks()}
        for path in files:
            name = path.stem
            if name in have:
                print(f"demo-seed: {name} already registered, left alone")
                continue
            client.upload(name, path)
            print(f"demo-seed: uploaded {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/opt/piggy/demo-tasks"))
