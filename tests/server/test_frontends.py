"""`piggy-serve --frontends 2`: two HTTP processes on one port, one engine service."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import psutil
import pytest

from piggyback_serve.masks import artifact as artifacts
from tests.reliability.test_process_signals import started
from tests.server.server_support import TASKS, make_artifact, metric, png
from tests.server.test_e2e import piggy_serve

pytestmark = pytest.mark.slow


def env_for(registry_dir) -> dict[str, str]:
    return dict(
        PIGGY_BACKBONE="resnet18",
        PIGGY_BACKBONE_WEIGHTS="random",
        PIGGY_REGISTRY=f"dir:{registry_dir}",
        PIGGY_ENGINE_WORKERS="1",
        PIGGY_REGISTRY_RESCAN_S="30",  # an upload must reach the others without a rescan
    )


def front_ends(url: str) -> list[psutil.Process]:
    """The front-end processes of the server listening at `url`."""
    port = url.rsplit(":", 1)[1]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "piggyback_serve.server.frontend" in cmdline:
            with_port = proc.environ().get("PIGGY_PORT") if proc.is_running() else None
            if with_port == port:
                found.append(proc)
    return found


def spread(url: str, task: str, count: int = 24) -> list[httpx.Response]:
    """`count` predictions at once, each on its own connection (so both front ends take some)."""

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/predict?task={task}", content=png(500 + i), timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def replicas(answers: list[httpx.Response]) -> set[str]:
    return {r.headers["x-piggy-replica"] for r in answers}


def test_front_ends_answer_as_one_server(tmp_path, registry_dir, reference):
    with piggy_serve(tmp_path, "--frontends", "2", **env_for(registry_dir)) as client:
        url = str(client.base_url).rstrip("/")
        assert len(front_ends(url)) == 2
        seen: set[str] = set()
        sent = dict.fromkeys(TASKS[:2], 0)
        for _ in range(5):  # connections spread by the kernel: a few rounds reach both
            for task in TASKS[:2]:
                answers = spread(url, task)
                sent[task] += len(answers)
                for i, r in enumerate(answers):
                    assert r.status_code == 200, r.text
                    reference.check(task, png(500 + i), r.json()["results"][0])
                seen |= replicas(answers)
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"one front end took every connection: {seen}"
        # One engine behind both: the same workers, whichever front end answers.
        pids = {tuple(w["pid"] for w in httpx.get(f"{url}/readyz").json()["workers"])}
        for _ in range(10):
            pids.add(tuple(w["pid"] for w in httpx.get(f"{url}/readyz").json()["workers"]))
        assert len(pids) == 1
        # /metrics of either front end counts the requests of both, and the engine's batches.
        for _ in range(4):
            text = httpx.get(f"{url}/metrics").text
            for task, count in sent.items():
                labels = dict(route="/predict", task=task, status="200")
                assert metric(text, "piggy_requests_total", **labels) == count
            assert metric(text, "piggy_batch_size_sum") == sum(sent.values())


def test_a_task_uploaded_through_one_front_end_is_served_by_all(tmp_path, registry_dir, backbone):
    path = artifacts.write(
        make_artifact(backbone, "newcomer", seed=7), tmp_path / "new.safetensors"
    )
    data = path.read_bytes()
    with piggy_serve(tmp_path, "--frontends", "2", **env_for(registry_dir)) as client:
        url = str(client.base_url).rstrip("/")
        put = httpx.put(f"{url}/tasks/newcomer", content=data, timeout=60)
        assert put.status_code == 201, put.text
        seen: set[str] = set()
        for _ in range(5):
            answers = spread(url, "newcomer", count=16)
            assert [r.status_code for r in answers] == [200] * 16, answers[0].text
            seen |= replicas(answers)
            if len(seen) == 2:
                break
        assert len(seen) == 2
        assert httpx.delete(f"{url}/tasks/newcomer", timeout=60).status_code == 204
        gone = spread(url, "newcomer", count=16)
        assert {r.status_code for r in gone} == {404}, gone[0].text


def test_a_killed_front_end_is_replaced(tmp_path, registry_dir, reference):
    with piggy_serve(tmp_path, "--frontends", "2", **env_for(registry_dir)) as client:
        url = str(client.base_url).rstrip("/")
        before = {p.pid for p in front_ends(url)}
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = {p.pid for p in front_ends(url)}
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:  # the new one too
            assert time.monotonic() < deadline
            time.sleep(0.2)
        answers = spread(url, TASKS[0])
        assert [r.status_code for r in answers] == [200] * len(answers)
        for i, r in enumerate(answers):
            reference.check(TASKS[0], png(500 + i), r.json()["results"][0])


def test_sigterm_drains_every_front_end_and_exits_0(tmp_path, registry_dir):
    # started() names the backbone and the registry itself.
    env = dict(PIGGY_ENGINE_WORKERS="1", PIGGY_FRONTENDS="2", PIGGY_GRPC_PORT="0")
    with started(tmp_path, registry_dir, **env) as (proc, url, log):
        workers = [p.pid for p in front_ends(url)]
        assert len(workers) == 2
        big = [
            ("file", (f"{i}.png", png(600 + i, size=(256, 256)), "image/png")) for i in range(16)
        ]

        def heavy(_: int) -> int:
            return httpx.post(f"{url}/predict?task={TASKS[0]}", files=big, timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            running = [pool.submit(heavy, i) for i in range(8)]
            time.sleep(0.5)  # every request sent and being answered
            proc.send_signal(signal.SIGTERM)
            statuses = [f.result() for f in running]
        assert statuses == [200] * 8, log.read_text()
        assert proc.wait(60) == 0, log.read_text()
        for pid in workers:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
