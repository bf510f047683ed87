"""bench/workers.py (issue 19): its figures from made-up runs (fast), the report rows, and
its quick mode end to end (slow: starts servers and pools)."""

from __future__ import annotations

import pytest

from bench import report, workers


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
        "kill": {
            "failed": 3,
            "requests": 100,
            "errors": {"503": 3},
            "max_batch": 8,
            "killed_pid": 1,
            "restarts": 1,
            "answers_after": 20,
        },
    }


def test_figures_from_made_up_runs():
    f = workers.figures(_bed())
    assert f["server ÷ limit, 1 task, HTTP, 64 px"] == pytest.approx(0.8)
    assert f["CPU outside the engine ÷ engine CPU, per image, 64 px"] == pytest.approx(0.25)
    assert f["engine pool, b8: 2 workers ÷ 1 worker, images/s (processes)"] == pytest.approx(1.9)
    assert f["in-process workers, b8: 2 threads ÷ 1 thread, images/s"] == pytest.approx(1.2)
    assert f["requests failed when a worker is killed under load"] == 3


def test_rows_reach_the_summary_table():
    results = {"beds": {}, "workers": {"beds": {"resnet18 64px b8": _bed()}}}
    rows = {name: (goal, value) for name, goal, value in report.summary_rows(results)}
    assert rows["server ÷ limit, 1 task, HTTP, 64 px (resnet18 64px b8)"][0] == "≥ 0.75"
    assert "## 8. Engine workers against the limit (issue 19)" in "\n".join(
        report._workers(results)
    )


@pytest.mark.slow
def test_quick_mode_runs():
    results = workers.run(quick=True)
    (bed,) = results["beds"].values()
    f = workers.figures(bed)
    assert f["server ÷ limit, 1 task, HTTP, 64 px"] > 0
    assert bed["kill"]["restarts"] >= 1 and bed["kill"]["answers_after"] == 20
