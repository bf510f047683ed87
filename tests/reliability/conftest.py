"""Fixtures for the reliability and security tests: the server tests' helpers
(tests/server/server_support.py), two small tasks on a random resnet18 at 32 px."""

from tests.server.server_support import registry_fixtures

TASKS = ("alpha", "beta")

backbone, task_files, reference, registry_dir, settings, anyio_backend = registry_fixtures(
    TASKS, "reliability-artifacts"
)
