"""Helpers for the Redis tests: a private redis-server on a free loopback port, and
`piggy-serve` processes started as the compose file starts its replicas."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own (never the machine's shared one), stoppable and restartable
    on the same port; with `persist`, its data is saved to and reloaded from `folder`."""

    def __init__(self, folder: Path, persist: bool = False):
        self.folder = folder
        self.port = free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (.ci/run installs it)"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.folder), "--logfile", "redis.log"]
        args += ["--dbfilename", "dump.rdb" if self.persist else "unused.rdb"]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def command(self, *words: str) -> bytes:
        """One command over a raw socket (no client library, no event loop)."""
        parts = [f"${len(w.encode())}\r\n{w}\r\n" for w in words]
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"*{len(words)}\r\n{''.join(parts)}".encode())
            return s.recv(4096)

    def kill(self) -> None:
        """SIGKILL: the way a crash or a lost host looks to the replicas."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def serve_command() -> list[str]:
    script = shutil.which("piggy-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "piggyback_serve.server"]


@contextmanager
def replica(log_path: Path, argv: list[str], env: dict[str, str], port: int):
    """A server process with exactly `env` (plus PATH and the like), ready before yielding."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIGGY_")}
    environ.update(env)
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(argv, env=environ, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + STARTUP_S
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def eventually(check, timeout_s: float, step_s: float = 0.02):
    """Call `check` until it returns a truthy value or raises no AssertionError; the value
    and the seconds it took. Fails after timeout_s with the last assertion."""
    started = time.monotonic()
    while True:
        try:
            value = check()
            if value:
                return value, time.monotonic() - started
        except AssertionError:
            if time.monotonic() - started > timeout_s:
                raise
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        time.sleep(step_s)
