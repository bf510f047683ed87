"""Fixtures for the server tests (helpers live in server_support.py)."""

from tests.server.server_support import TASKS, registry_fixtures

backbone, task_files, reference, registry_dir, settings, anyio_backend = registry_fixtures(
    TASKS, "artifacts"
)
