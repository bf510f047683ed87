"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis),
in-process over ASGI: no 5xx, every response as documented, every error in the one shape."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from piggyback_serve.server.app import create_app
from tests.server.server_support import settings_for

EXAMPLES = 100  # per operation and mode: over 1,000 requests in all
ADMIN = "Bearer fuzz-admin"


@pytest.fixture(scope="session")
def fuzzed_app(tmp_path_factory, task_files, backbone):
    home = tmp_path_factory.mktemp("fuzz")
    folder = home / "tasks"
    folder.mkdir()
    for path in task_files.values():
        shutil.copy(path, folder / path.name)
    # Small limits so that generated bodies reach them; a token so writes are refused
    # (a generated DELETE must not remove the tasks the rest of the run predicts with).
    app = create_app(
        settings_for(home, folder, max_body_bytes=64 * 1024, admin_token="fuzz-admin"), backbone
    )
    with asgi.get_client(app) as client:  # starts the lifespan, kept until the session ends
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.05)
    yield app
    asgi.shutdown_lifespans()


def error_shape(response, case) -> None:
    """4xx/5xx bodies: `{"error": {"code", "message"}}`, or `{"error": "..."}` under /v2."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    if case.operation.path.startswith("/v2"):
        assert isinstance(body["error"], str) and body["error"], body
    else:
        assert set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"].replace("_", "").isalnum(), body
    if response.status_code == 503:
        assert "retry-after" in {k.lower() for k in response.headers}, body


def runs(operations):
    """(operation, mode, fixed parts): every route with schema-valid and schema-invalid
    data, then again with a real task so that bodies get past the task lookup."""
    known = {"path_parameters": {"name": "alpha"}}
    for op in operations:
        has_input = bool(op.path_parameters or op.query or op.body)
        yield op, GenerationMode.POSITIVE, {}
        if has_input:
            yield op, GenerationMode.NEGATIVE, {}
        if op.path == "/predict":
            yield op, GenerationMode.POSITIVE, {"query": {"task": "alpha"}}
            yield op, GenerationMode.NEGATIVE, {"query": {"task": "alpha"}}
        elif op.method.upper() == "PUT":  # with the token: bodies reach validation
            yield op, GenerationMode.POSITIVE, {"headers": {"Authorization": ADMIN}}
        elif "{name}" in op.path and op.method.upper() != "DELETE":
            yield op, GenerationMode.POSITIVE, known


@pytest.mark.slow
def test_every_route_survives_generated_requests(fuzzed_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [op.ok() for op in schema.get_all_operations()]
    sent: Counter = Counter()
    impossible: list[str] = []
    for operation, mode, fixed in runs(operations):

        @given(case=operation.as_strategy(mode, **fixed))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            sent[case.operation.label] += 1
            response = case.call()
            # No 5xx, documented status codes and headers, body schema, content type, and
            # schema-invalid data rejected. Not "schema-valid data accepted": random bytes
            # fit the schema's `format: binary` and are rightly 415.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
            error_shape(response, case)

        try:
            fuzz()
        except Unsatisfiable:  # e.g. a free string parameter has no schema-invalid value
            assert mode is GenerationMode.NEGATIVE, operation.label
            impossible.append(operation.label)
    assert len(operations) >= 15 and set(sent) == {op.label for op in operations}, sent
    assert sum(sent.values()) >= 1000, sent
    print(
        f"fuzzed {sum(sent.values())} requests over {len(operations)} operations: {sent}; "
        f"no invalid data for {impossible}"
    )
