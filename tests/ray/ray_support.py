"""`piggy-serve --ray` as a child process with a Ray of its own, and every process it
starts stopped by pid (Ray's actors run in process groups of their own, so stopping the
group is not enough)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

STARTUP_S = 240
TOKEN = "ray-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServe:
    """One local Ray + Serve running our app, on a free loopback port."""

    def __init__(
        self,
        log: Path,
        env: dict[str, str],
        replicas: int,
        replica_cpus: float,
        extra_args: tuple[str, ...] = ("--log-level", "warning"),
    ):
        self.port = free_port()
        self.log = log
        # Short: Ray puts Unix sockets under it, and their paths are limited to ~107 bytes.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="pgray", dir="/tmp"))
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("PIGGY_", "RAY_"))}
        environ.update(env, RAY_TMPDIR=str(self.ray_tmp), RAY_USAGE_STATS_ENABLED="0")
        argv = [sys.executable, "-m", "piggyback_serve.server", "--ray"]
        argv += ["--replicas", str(replicas)]
        argv += ["--replica-cpus", str(replica_cpus), "--port", str(self.port), *extra_args]
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            env=environ,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # psutil.Process objects, not bare pids: a pid reused later is never signalled.
        self._seen: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = STARTUP_S) -> float:
        """Seconds from start until the proxy answers /readyz with 200."""
        deadline = time.perf_counter() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.perf_counter() < deadline:
                assert self.proc.poll() is None, f"piggy-serve --ray exited:\n{self.tail()}"
                self.pids()  # note Ray's processes while they are easy to find
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        return time.perf_counter() - self.started
                time.sleep(0.25)
        raise AssertionError(f"not ready after {timeout_s}s:\n{self.tail()}")

    def pids(self) -> set[int]:
        """Every process of this Ray seen so far: the CLI's descendants, and any process
        that names our private temp dir (raylet, GCS), in case one was re-parented."""
        found = []
        with contextlib.suppress(psutil.Error):
            found += psutil.Process(self.proc.pid).children(recursive=True)
        tmp = str(self.ray_tmp)
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if any(tmp in part for part in p.info["cmdline"] or ()):
                    found += [p, *p.children(recursive=True)]
        for p in found:
            if p.pid != os.getpid():
                self._seen.setdefault(p.pid, p)
        return set(self._seen)

    def node_metrics(self) -> str:
        """What Ray's metrics agent exports for Prometheus (its port is chosen at random)."""
        self.pids()
        agents = [p for p in self._seen.values() if "DashboardAgent" in _name(p)]
        texts = []
        for port in listening_ports(agents):
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                if r.status_code == 200:
                    texts.append(r.text)
        return "\n".join(texts)

    def tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-n:].decode(errors="replace")
        return ""

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (a clean Serve and Ray shutdown), then SIGKILL whatever is left, by pid."""
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.pids()
        for proc in self._seen.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()  # psutil checks the process is still the one it saw
                proc.wait(5)
        self._log_file.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def listening_ports(procs) -> set[int]:
    """The TCP ports these processes listen on."""
    ports = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    ports.add(conn.laddr.port)
    return ports


def replica_pid(response: httpx.Response) -> int:
    """The pid in X-Piggy-Replica (`<host>:<pid>`)."""
    return int(response.headers["x-piggy-replica"].rsplit(":", 1)[1])


def _name(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""
