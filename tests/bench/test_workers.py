"""bench/scenarios/workers.py: its figures from made-up runs (fast), and its quick mode end
to end (slow: starts servers and pools)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.bed import Options
from bench.scenarios import SCENARIOS, workers


def _bed() -> dict:
    limit = [{"images_per_cpu_s": 100.0, "batch": 8}] * 4
    server = [
        {"images_per_cpu_s": 80.0, "images_per_s": 80.0, "parent_cpu_s": 1.0, "workers_cpu_s": 4.0}
    ] * 3
    return {
        "size": 64,
        "serving": {"limit": limit, "server": server},
        "scaling": {
            "pool": {"1": [10.0, 10.0], "2": [19.0, 19.0]},
            "threads": {1: [10.0], 2: [12.0]},
        },
        "kill": {"failed": 3, "requests": 100, "restarts": 1, "answers_after": 20},
    }


def test_figures_from_made_up_runs():
    f = workers.figures(_bed())
    assert f["server ÷ limit, 1 task, HTTP, 64 px"] == pytest.approx(0.8)
    assert f["CPU outside the engine ÷ engine CPU, per image, 64 px"] == pytest.approx(0.25)
    assert f["engine pool, b8: 2 workers ÷ 1 worker, images/s (processes)"] == pytest.approx(1.9)
    assert f["in-process workers, b8: 2 threads ÷ 1 thread, images/s"] == pytest.approx(1.2)
    assert f["requests failed when a worker is killed under load"] == 3


def test_every_figure_and_table_is_declared():
    found = workers.summarize(
        {"resnet18 64px b8": _bed(), "resnet18 224px b8": {**_bed(), "size": 224}}
    )
    assert {f["figure"] for f in found["figures"]} == set(SCENARIOS["workers"].figures)
    for key, rows in found["tables"].items():
        columns = SCENARIOS["workers"].tables[key].columns
        assert rows and all(len(row) == len(columns) for row in rows), key


@pytest.mark.slow
def test_quick_mode_runs():
    results = workers.measure(SimpleNamespace(device="cpu", options=Options(quick=True)))
    (bed,) = results.values()
    f = workers.figures(bed)
    assert f["server ÷ limit, 1 task, HTTP, 64 px"] > 0
    assert bed["kill"]["restarts"] >= 1 and bed["kill"]["answers_after"] == 20
