"""Servers under test, each in its own process (group) on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process in its own session, its output in a log file, stopped as a group."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, port: int):
        self.port = port
        self.log = log
        self.started = time.perf_counter()
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, path: str, timeout_s: float) -> float:
        """Poll `path` until it answers 200; seconds since the process was started."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.log.name}: exited {self.popen.returncode}:\n{self.tail()}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.url(path), timeout=2) as r,
            ):
                if r.status == 200:
                    return time.perf_counter() - self.started
            time.sleep(0.05)
        raise TimeoutError(f"{self.log.name}: {path} not ready after {timeout_s}s:\n{self.tail()}")

    def rss_bytes(self, children: bool = False) -> int:
        proc = psutil.Process(self.popen.pid)
        procs = [proc, *proc.children(recursive=True)] if children else [proc]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu_s(self, children: bool = False) -> float:
        """CPU seconds (user + system) used so far by the process (and its descendants)."""
        proc = psutil.Process(self.popen.pid)
        procs = [proc, *proc.children(recursive=True)] if children else [proc]
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of the server's process tree, by role (`roles`)."""
        found = dict.fromkeys(ROLES, 0.0)
        for role, p in roles(psutil.Process(self.popen.pid)):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                found[role] += t.user + t.system
        return found

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-n:].decode(errors="replace")
        return ""

    def stop(self, timeout_s: float = 20) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Whatever the leader left behind in its group (Ray's workers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log_file.close()


ROLES = ("main", "frontends", "helpers", "engine")
FRONTEND = "piggyback_serve.server.frontend"  # a front end's command line (server/frontend.py)
HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker", "torch_shm_manager")


def roles(main: psutil.Process) -> list[tuple[str, psutil.Process]]:
    """Our server's processes by role: `main` (the single-process server, or with
    --frontends the supervisor and engine service), `frontends` (server/frontend.py's
    processes), `helpers` (multiprocessing's forkserver and resource trackers, torch's shared-memory
    manager) and `engine`
    (the engine workers: the forkserver's children, which inherit its command line)."""
    out = [("main", main)]
    for p in main.children(recursive=True):
        try:
            cmdline, parent = p.cmdline(), p.parent()
            helper = _helper(cmdline) and not (parent and _helper(parent.cmdline()))
        except psutil.Error:
            continue
        role = "frontends" if FRONTEND in cmdline else "helpers" if helper else "engine"
        out.append((role, p))
    return out


def _helper(cmdline: list[str]) -> bool:
    return any(h in arg for arg in cmdline for h in HELPERS)


def start_ours(
    workdir: Path,
    registry: Path,
    backbone: str,
    weights: str | None,
    batch: int,
    tag: str = "ours",
    extra_env: dict[str, str] | None = None,
) -> Proc:
    """piggy-serve on a free port, serving the folder registry `registry`."""
    port = free_port()
    env = {
        "PIGGY_HOME": str(workdir / "home"),
        "PIGGY_REGISTRY": f"dir:{registry}",
        "PIGGY_BACKBONE": backbone,
        "PIGGY_MAX_BATCH_SIZE": str(batch),
        "PIGGY_QUEUE_SIZE": "1024",
        "PIGGY_REGISTRY_RESCAN_S": "30",  # nothing changes the folder during a run
        "PIGGY_GRPC_PORT": "0",  # no gRPC unless a scenario asks (oip_grpc)
        **(extra_env or {}),
    }
    if weights is not None:
        env["PIGGY_BACKBONE_WEIGHTS"] = weights
    argv = [sys.executable, "-m", "piggyback_serve.server", "--port", str(port)]
    argv += ["--log-level", "warning"]
    return Proc(argv, env, workdir / f"{tag}-{port}.log", port)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy so far (every core, every process)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_quiet(max_s: float = 15.0, below: float = 0.3) -> float:
    """Wait (at most `max_s`) for a second in which the machine is busy less than `below`
    cores: on a shared machine a window next to another tenant's work measures both. The
    cores busy in the last second waited."""
    deadline = time.perf_counter() + max_s
    while True:
        busy0, t0 = machine_busy_s(), time.perf_counter()
        time.sleep(1.0)
        cores = (machine_busy_s() - busy0) / (time.perf_counter() - t0)
        if cores < below or time.perf_counter() > deadline:
            return cores
        time.sleep(1.0)


REPO = Path(__file__).resolve().parent.parent


def start_module(workdir: Path, module: str, args: list[str], tag: str) -> Proc:
    """A peer server: `python -m module --port P args...` (its workers can import bench)."""
    port = free_port()
    argv = [sys.executable, "-m", module, "--port", str(port), *args]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return Proc(argv, {"PYTHONPATH": path}, workdir / f"{tag}-{port}.log", port)
