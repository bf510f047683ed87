"""Fixtures for the reliability and security tests: the server tests' helpers
(tests/server/server_support.py), two small tasks on a random resnet18 at 32 px."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

from server_support import registry_fixtures  # noqa: E402

TASKS = ("alpha", "beta")

backbone, task_files, reference, registry_dir, settings, anyio_backend = registry_fixtures(
    TASKS, "reliability-artifacts"
)
