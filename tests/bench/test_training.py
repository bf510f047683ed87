"""bench/scenarios/training.py: its figures, verdicts and tables from made-up raw data."""

from __future__ import annotations

import copy

import pytest

from bench.scenarios import SCENARIOS, training


def _machine(wall: float = 15.0, server: float = 3.0) -> dict:
    return {
        "wall_s": wall,
        "server_cpu_s": server,
        "bench_cpu_s": 0.3,
        "others_cores": 0.1,
        "load_before": 1.5,
        "load_after": 1.6,
    }


def _window(side: str, latencies: list[float], job: dict | None = None) -> dict:
    w = {
        "side": side,
        "latencies_ms": latencies,
        "requests": len(latencies),
        "errors": {},
        "p50_ms": sorted(latencies)[len(latencies) // 2],
        "p99_ms": max(latencies),
        "machine": _machine(),
    }
    return {**w, "job": job} if job else w


def _raw() -> dict:
    """A job served 120 s after its upload at 0.92 held-out accuracy, the CLI at 0.92 too;
    /predict at 10 ms without a job (100 ms once in 101), 15 ms during one (150 ms once); the
    bomb stopped 39,680 bytes short of a 512 MiB limit, 422 over HTTP, nothing left."""
    limit = 512 << 20
    without = [10.0] * 100 + [100.0]
    during = [15.0] * 100 + [150.0]
    job = {"step_before": 3, "step_after": 60, "steps": 200, "state_after": "running"}
    message = f"the archive expands to more than {limit:,} bytes: stopped after writing 536,831,232"
    return {
        "backbone": "efficientnet_lite0",
        "rate": 20.0,
        "cores": 2,
        "data": {"classes": 5, "per_class": 80, "bytes": 400_000},
        "job": {
            "job": {
                "state": "succeeded",
                "result": {
                    "accuracy": 0.92,
                    "baseline_accuracy": 0.85,
                    "size_bytes": 60_000,
                    "sparsity": 0.01,
                },
            },
            "seen_s": {"posted": 0.5, "queued": 0.5, "running": 0.7, "succeeded": 119.0},
            "steps": [[9.0, 1, 200, 1, 20], [100.0, 200, 200, 20, 20]],
            "first_predict_s": 120.0,
            "predict_attempts": 1,
            "machine": _machine(120.0, 130.0),
        },
        "cli": {
            "wall_s": 110.0,
            "cpu_s": 108.0,
            "others_cores": 0.2,
            "load_before": 1.0,
            "load_after": 1.1,
            "printed": {
                "piggyback": {"accuracy_pct": 92.0, "s": 95},
                "classifier-only": {"accuracy_pct": 85.0, "s": 10},
            },
            "metrics": {"accuracy": 0.92, "sparsity": 0.01},
        },
        "p99": {
            "windows": [
                _window("without", without[:50]),
                _window("during", during[:50], job),
                _window("during", during[50:], job),
                _window("without", without[50:]),
            ],
            "cancel_status": 200,
        },
        "bomb": {
            "zip_bytes": 9_975_346,
            "expanded_bytes": 10**9,
            "in_process": {
                "limit": limit,
                "refused": True,
                "written": 536_831_232,
                "error": message,
                "left_bytes": 0,
                "seconds": 1.5,
            },
            "http": {
                "status": 422,
                "error": {"error": {"code": "invalid_archive", "message": message}},
                "written": 536_831_232,
                "peak_jobs_bytes": 546_806_578,
                "left_under_jobs": [],
                "bomb_jobs_listed": 0,
                "seconds": 2.0,
            },
        },
    }


def _verdicts(found: dict) -> dict[str, str]:
    return {row[0]: row[3] for row in found["tables"]["checks"]}


def test_figures_from_made_up_runs():
    found = training.summarize(_raw())
    values = {f["figure"]: f["value"] for f in found["figures"]}
    assert values[training.WALL] == 120.0
    assert values[training.ACCURACY] == pytest.approx(0.0)
    # the p99 of each side's requests pooled over its windows: the one slow request each
    assert values[training.P99] == pytest.approx(
        training.percentile([15.0] * 100 + [150.0], 99)
        / training.percentile([10.0] * 100 + [100.0], 99)
    )
    assert values[training.BOMB] == 536_831_232
    assert set(_verdicts(found).values()) == {"met"}


def test_the_job_and_the_cli_side_by_side():
    rows = {r[0]: r for r in training.summarize(_raw())["tables"]["accuracy"]}
    job, cli = rows["job (GET /jobs/{id})"], rows["piggy-masks train"]
    assert job[1:5] == pytest.approx([92.0, 85.0, 1.0, 91.0])  # training: first to last step
    assert job[5:7] == [120.0, 130.0]
    assert cli[1:8] == pytest.approx([92.0, 85.0, 1.0, 95, 110.0, 108.0, 0.2])


def test_every_figure_and_table_is_declared():
    found = training.summarize(_raw())
    scenario = SCENARIOS["training"]
    assert [f["figure"] for f in found["figures"]] == list(scenario.figures)
    assert set(found["tables"]) == set(scenario.tables)
    for key, rows in found["tables"].items():
        columns = scenario.tables[key].columns
        assert rows and all(len(row) == len(columns) for row in rows), key


def test_missed_goals_are_said_missed():
    raw = copy.deepcopy(_raw())
    raw["job"]["first_predict_s"] = 200.0
    raw["cli"]["metrics"]["accuracy"] = 0.9
    raw["p99"]["windows"][1]["latencies_ms"] = [500.0] * 50
    raw["bomb"]["http"]["left_under_jobs"] = ["abc/upload"]
    found = training.summarize(raw)
    values = {f["figure"]: f["value"] for f in found["figures"]}
    assert values[training.ACCURACY] == pytest.approx(2.0)
    assert set(_verdicts(found).values()) == {"missed"}


def test_a_failed_job_has_no_wall_time_nor_accuracy():
    raw = copy.deepcopy(_raw())
    raw["job"]["job"] = {"state": "failed", "result": None}
    raw["job"]["first_predict_s"] = None
    found = training.summarize(raw)
    values = {f["figure"]: f["value"] for f in found["figures"]}
    assert values[training.WALL] is None and values[training.ACCURACY] is None
    verdicts = _verdicts(found)
    assert verdicts[training.WALL] == verdicts[training.ACCURACY] == "missed"


def test_bomb_not_refused_over_http_is_missed():
    raw = copy.deepcopy(_raw())
    raw["bomb"]["http"]["status"] = 202
    assert _verdicts(training.summarize(raw))[training.BOMB] == "missed"
