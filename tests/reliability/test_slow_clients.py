"""Slow clients, against the real process: a connection that trickles its request head is
closed after PIGGY_HEADER_TIMEOUT_S while normal clients are served; an idle keep-alive one
is closed as before."""

from __future__ import annotations

import select
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.reliability.test_process_signals import started
from tests.server.server_support import png

pytestmark = pytest.mark.slow
HEADER_TIMEOUT_S = 1.0
TRICKLERS = 20
TRICKLE_EVERY_S = 0.3
# Closed within the timeout plus this: a loaded 2-core machine, a benchmark beside us.
SLACK_S = 2.0
HEAD = b"GET /healthz HTTP/1.1\r\nHost: piggy\r\nUser-Agent: slow-loris\r\nAccept: */*\r\n\r\n"


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=5)


def status(sock: socket.socket) -> bytes:
    """Read one whole answer (headers, then content-length bytes); its status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "closed mid-answer"
        body += chunk
    return head.split(b"\r\n", 1)[0]


def closed_by_peer(sock: socket.socket) -> bool:
    """The server has closed its end (EOF or reset); never blocks."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(4096) == b""  # anything else would be an answer: not closed
    except OSError:
        return True


def trickle(socks: list[socket.socket], bound_s: float) -> dict[int, float]:
    """One more head byte to each open socket every TRICKLE_EVERY_S; when each was seen
    closed by the server (index -> seconds after the start), within `bound_s`."""
    started_at, closed, sent = time.monotonic(), {}, 0
    while len(closed) < len(socks) and time.monotonic() - started_at < bound_s:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            if closed_by_peer(sock):
                closed[i] = time.monotonic() - started_at
                continue
            try:
                sock.send(HEAD[sent : sent + 1])
            except OSError:
                closed[i] = time.monotonic() - started_at
        sent = min(sent + 1, len(HEAD) - 3)  # never the whole head
        time.sleep(TRICKLE_EVERY_S)
    return closed


@pytest.mark.parametrize("frontends", ["1", "2"])  # one process; front ends and an engine
def test_slow_head_senders_are_closed_while_normal_clients_are_served(
    tmp_path, registry_dir, frontends
):
    env = dict(
        PIGGY_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), PIGGY_GRPC_PORT="0", PIGGY_FRONTENDS=frontends
    )
    with started(tmp_path, registry_dir, **env) as (_proc, url, _log):
        socks = [connect(url) for _ in range(TRICKLERS)]
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                # A normal client between the trickles: served all along.
                assert client.get("/healthz").status_code == 200
                closed = trickle(socks[: TRICKLERS // 2], bound_s=2.5 * HEADER_TIMEOUT_S)
                r = client.post(
                    "/predict?task=alpha", content=png(1), headers={"content-type": "image/png"}
                )
                assert r.status_code == 200, r.text
                rest = trickle(socks[TRICKLERS // 2 :], bound_s=HEADER_TIMEOUT_S + SLACK_S)
                assert client.get("/healthz").status_code == 200
            assert len(closed) == TRICKLERS // 2, closed
            # The second half was opened with the first: the timeout counts from the open.
            assert len(rest) == TRICKLERS - TRICKLERS // 2, rest
            assert max(closed.values()) < HEADER_TIMEOUT_S + SLACK_S, closed
            assert min(closed.values()) >= HEADER_TIMEOUT_S - TRICKLE_EVERY_S, closed
        finally:
            for sock in socks:
                sock.close()


def test_keep_alive_connections_are_served_then_closed_when_idle_or_slow(tmp_path, registry_dir):
    env = dict(PIGGY_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), PIGGY_GRPC_PORT="0")
    with started(tmp_path, registry_dir, **env) as (_proc, url, _log):
        idle, slow, busy = connect(url), connect(url), connect(url)
        try:
            for sock in (idle, slow, busy):
                sock.sendall(HEAD)
                assert status(sock) == b"HTTP/1.1 200 OK"
            # Requests sent well within the timeout, one after another: all answered on one
            # connection, past several timeouts in all.
            for _ in range(4):
                time.sleep(HEADER_TIMEOUT_S / 2)
                busy.sendall(HEAD)
                assert status(busy) == b"HTTP/1.1 200 OK"
            # The slow one began a second head after its answer and never finished it; the
            # idle one sent nothing. Both are closed in time.
            closed = trickle([slow], bound_s=HEADER_TIMEOUT_S + SLACK_S)
            assert closed, "a keep-alive connection trickling a head stayed open"
            deadline = time.monotonic() + HEADER_TIMEOUT_S + SLACK_S
            while not closed_by_peer(idle):
                assert time.monotonic() < deadline, "an idle keep-alive connection stayed open"
                time.sleep(0.05)
        finally:
            for sock in (idle, slow, busy):
                sock.close()
