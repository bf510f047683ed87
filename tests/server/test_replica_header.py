"""X-Piggy-Replica: every answer names the process that gave it, without Ray too."""

import pytest

from piggyback_serve.server.replica import replica_id
from tests.server.server_support import png, serving

pytestmark = pytest.mark.anyio


async def test_every_answer_names_this_process(settings, backbone):
    me = replica_id()
    host, pid = me.rsplit(":", 1)
    assert host and int(pid) > 0
    async with serving(settings, backbone) as client:
        answers = [
            await client.get("/healthz"),
            await client.get("/tasks"),
            await client.post(
                "/predict?task=alpha", content=png(1), headers={"content-type": "image/png"}
            ),
            await client.post("/predict?task=nope", content=png(1)),  # 404
            await client.get("/no/such/route"),  # 404 from the router
            await client.put("/tasks/x", content=b"not an artifact"),  # 422
        ]
        assert [r.status_code for r in answers] == [200, 200, 200, 404, 404, 422]
        assert {r.headers["x-piggy-replica"] for r in answers} == {me}
