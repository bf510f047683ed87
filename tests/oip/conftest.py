"""Fixtures: a live server on loopback (tests/client/live_server.py)."""

from tests.client.live_server import live, live_artifacts  # noqa: F401
