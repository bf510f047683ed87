from types import SimpleNamespace

import pytest

from bench.bed import Options


@pytest.fixture
def quick_ctx():
    """What a scenario's measure() gets from bench/run.py, in --quick mode on the CPU."""
    return SimpleNamespace(device="cpu", options=Options(quick=True, repeats=1, window_s=0.3))


@pytest.fixture
def multitask_http() -> dict:
    """bench.scenarios.multitask's HTTP results as a run returns them: one task 100
    img/CPU-s, 200 tasks 85, 4 in turn 96; 50 bytes more RSS and 120 bytes of task state
    per task."""
    runs = lambda rate: [{"images_per_s": rate, "images_per_cpu_s": rate}] * 3  # noqa: E731
    return {
        "one": runs(100.0),
        "many": runs(85.0),
        "mixed4": runs(96.0),
        "rss_one_task": 1000,
        "rss_many": 1000 + 199 * 50,
        "n_tasks": 200,
        "artifact_bytes": 100,
        "task_state_bytes": 200 * 120,
    }
