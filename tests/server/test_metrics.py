"""/metrics (server/metrics.py): request latency per route template, method, status class
and task, with bounded labels; docs/serving.md lists exactly the metrics that exist."""

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from piggyback_serve.server.metrics import METHODS, UNKNOWN_TASK, UNMATCHED
from piggyback_serve.server.routes.docs import ASSETS_URL
from tests.server.server_support import TASKS, png, serving

pytestmark = pytest.mark.anyio

LATENCY = "piggy_request_duration_seconds"
SERVING_DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def latency_series(text: str) -> dict[tuple, dict[str, float]]:
    """(route, method, status_class, task) -> {"count", "sum", "inf"} of the histogram."""
    found: dict[tuple, dict[str, float]] = {}
    for sample in families(text)[LATENCY].samples:
        labels = dict(sample.labels)
        le = labels.pop("le", None)
        key = tuple(labels[k] for k in ("route", "method", "status_class", "task"))
        part = sample.name.removeprefix(LATENCY)
        if part == "_count":
            found.setdefault(key, {})["count"] = sample.value
        elif part == "_sum":
            found.setdefault(key, {})["sum"] = sample.value
        elif part == "_bucket" and le == "+Inf":
            found.setdefault(key, {})["inf"] = sample.value
    return found


async def test_request_latency_per_route_template_method_status_and_task(settings, backbone):
    async with serving(settings, backbone) as client:
        for seed in (1, 2):
            assert (await client.post("/predict?task=beta", content=png(seed))).status_code == 200
        assert (await client.get("/tasks/alpha")).status_code == 200
        assert (await client.get(f"{ASSETS_URL}/swagger-ui.css")).status_code == 200
        assert (await client.get("/web/app.js")).status_code == 200
        assert (await client.get("/no/such/route")).status_code == 404
        assert (await client.request("BREW", "/predict?task=beta")).status_code == 405
        await client.get("/metrics")  # its own series, before the rounds compared below

        async def random_requests(tag: str) -> dict:
            """Random names, raw paths and methods: they must add no label values."""
            for i in range(20):
                await client.post(f"/predict?task={tag}{i}", content=b"x")
                await client.get(f"/tasks/{tag}{i}")
                await client.get(f"/v2/models/{tag}{i}")
                await client.get(f"/{tag}/path/{i}")
                await client.get(f"{ASSETS_URL}/{tag}{i}.js")
                await client.request(f"{tag.upper()}{i}", "/tasks")
            return latency_series((await client.get("/metrics")).text)

        first = await random_requests("random")
        series = await random_requests("other")

    predicted = series[("/predict", "POST", "2xx", "beta")]
    assert predicted["count"] == predicted["inf"] == 2 and predicted["sum"] > 0
    assert series[("/tasks/{name}", "GET", "2xx", "alpha")]["count"] == 1
    assert series[(f"{ASSETS_URL}/{{path}}", "GET", "2xx", "")]["count"] == 1
    assert series[("/web/{path}", "GET", "2xx", "")]["count"] == 1
    assert series[(UNMATCHED, "GET", "4xx", "")]["count"] >= 1
    assert series[("/predict", "other", "4xx", "")]["count"] == 1  # BREW: 405
    assert series[("/predict", "POST", "4xx", UNKNOWN_TASK)]["count"] == 40
    assert series[("/tasks/{name}", "GET", "4xx", UNKNOWN_TASK)]["count"] == 40
    assert series[("/v2/models/{name}", "GET", "4xx", UNKNOWN_TASK)]["count"] == 40
    assert series[(f"{ASSETS_URL}/{{path}}", "GET", "4xx", "")]["count"] == 40
    assert series[("/tasks", "other", "4xx", "")]["count"] == 40

    assert set(series) == set(first)  # 20 more random names: no new series
    for route, method, status_class, task in series:
        assert "random" not in route and "other" not in route
        assert method in METHODS | {"other"}
        assert re.fullmatch(r"[1-5]xx", status_class)
        assert task in {"", UNKNOWN_TASK, *TASKS}


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """docs/serving.md's metrics table: name -> (type, labels)."""
    section = SERVING_DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(piggy_\w+)` \| (\w+) \| ([^|]*)\|", section, re.M)
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


async def test_the_docs_list_exactly_the_metrics_that_exist(settings, backbone):
    async with serving(settings, backbone) as client:
        assert (await client.post("/predict?task=alpha", content=png(3))).status_code == 200
        assert (await client.post("/predict?task=nope", content=b"x")).status_code == 404
        text = (await client.get("/metrics")).text
    exported = {}
    for family in families(text).values():
        if family.name.endswith("_created"):  # the text parser's view of `_created` samples
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = set().union(*(s.labels for s in family.samples)) - {"le"}
        exported[name] = (family.type, labels)
    assert documented_metrics() == exported
