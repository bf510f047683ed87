"""Fixtures: a live server on loopback (tests/client/live_server.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))
from live_server import live, live_artifacts  # noqa: E402, F401
