"""bench/ray_proxy.py's report, from made-up runs: the issue's figure names, ratios per
repeat (not of medians), and every side's row."""

from __future__ import annotations

from bench.ray_proxy import render


def _run(per_cpu_s: float) -> dict:
    return {
        "images_per_s": per_cpu_s,
        "images_per_cpu_s": per_cpu_s,
        "p50_ms": 10.0,
        "p99_ms": 20.0,
        "errors": {"503": 1},
    }


def test_the_report_names_the_figures_with_ratios_per_repeat():
    fig = {
        "config": "resnet18 64px b16",
        "clients": 32,
        "cpus": 2,
        "ray1_startup_s": 50.0,
        "ray2_startup_s": 60.0,
        "replaced_s": 12.34,
        "runs": {
            "direct_a": [_run(100), _run(50)],
            "ray1": [_run(90), _run(20)],  # ratios 0.9 and 0.4: median 0.65
            "direct_b": [_run(100)],
            "ray2": [_run(30)],
        },
    }
    text = render(fig, "python -m bench.ray_proxy")
    assert "| Ray proxy ÷ direct, 1 task, HTTP (1 replica) | 0.65 [0.40–0.90] |" in text
    assert "| Ray proxy ÷ direct, 1 task, HTTP (2 replicas) | 0.30 |" in text
    assert "| a killed replica replaced (SIGKILL → a new replica answers) | 12.3 s |" in text
    for side in ("direct_a", "ray1", "direct_b", "ray2"):
        assert f"| {side} |" in text
