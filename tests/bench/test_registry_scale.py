"""bench/scenarios/registry_scale.py: its page rendered from a small made-up record (fast),
the task copies it writes (fast), and its quick mode end to end (slow: six servers)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import record, render, run
from bench.bed import Options
from bench.scenarios import SCENARIOS, registry_scale
from piggyback_serve.masks import artifact as artifacts

MB = 10**6


def _raw() -> dict:
    """Two rounds of 0 / 1,000 / 10,000 tasks: as many descriptors at each; 50 MB more RSS
    at 10,000 than at 0 (5 kB per task, files of 50 kB: 0.1); ready after ~9 s and ~12 s."""

    def row(tasks, ready_s, rss):
        return {"tasks": tasks, "ready_s": ready_s, "listed": tasks, "loaded": 0, "failed": 0,
                "rss_bytes": rss, "pss_bytes": rss // 2, "fds": 50, "processes": 5}  # fmt: skip

    tiers = {"host": {"tasks": 21, "bytes": 2_100_000, "budget": 4 * 10**9, "hits": 21,
                      "misses": 21, "evictions": 0}}  # fmt: skip
    evict = {"host": {"tasks": 10, "bytes": 1_000_000, "budget": 1_050_000, "hits": 0,
                      "misses": 150, "evictions": 140}}  # fmt: skip
    return {
        "backbone": "efficientnet_lite0",
        "write_s": 3.5,
        "checked": 24,
        "mean_artifact_bytes": 50_000.0,
        "scale": [
            row(0, 9.0, 2800 * MB),
            row(1000, 9.5, 2805 * MB),
            row(10000, 12.0, 2850 * MB),
            row(0, 9.2, 2800 * MB),
            row(1000, 9.5, 2805 * MB),
            row(10000, 12.4, 2850 * MB),
        ],
        "listing": {
            "index_s": 0.25,
            "refresh_s": 2.4,
            "refresh_cpu_s": 1.7,
            "listed": 10000,
            "parse_cpu_s": 0.9,
        },  # fmt: skip
        "nofile": {
            "tasks": 10000,
            "nofile": [1024, 1024],
            "ready_s": 12.5,
            "listed": 10000,
            "failed": 0,
            "fds_ready": 51,
            "fds_after": 51,
            "sampled": 50,
            "answered": 50,
            "statuses": [200] * 50,
            "loaded_after": 50,
        },  # fmt: skip
        "cold": {
            "input_size": 224,
            "ready_s": 9.0,
            "first_ms": [60.0, 50.0, 70.0],
            "second_ms": [40.0, 40.0, 45.0],
            "statuses": [200] * 6,
            "tiers": tiers,
        },  # fmt: skip
        "evict": {
            "tasks": 50,
            "held": 10,
            "state_bytes": 100_000.0,
            "budget": 1_050_000,
            "statuses": [200] * 150,
            "ms": [30.0] * 149 + [90.0],
            "loaded": 10,
            "tiers": evict,
        },  # fmt: skip
    }


def test_figures_from_a_made_up_run():
    found = {f["figure"]: f for f in registry_scale.summarize(_raw())["figures"]}
    assert set(found) == set(SCENARIOS["registry_scale"].figures)
    value = lambda name: getattr(found[name]["value"], "median", found[name]["value"])  # noqa: E731
    assert value("open descriptors of the serving tree, N tasks ÷ 0 tasks") == 1.0
    assert value("ready after start, N tasks, s") == pytest.approx(12.2)
    assert value("serving-tree RSS per registered, unused task ÷ its file bytes") == (
        pytest.approx(0.1)
    )
    assert value("tasks listed under ulimit -n 1024 ÷ registered") == 1.0
    assert value("first request ÷ second, fresh tasks, 224 px, medians") == pytest.approx(1.5)
    assert found["ready after start, N tasks, s"]["on"] == "efficientnet_lite0, 10,000 tasks"


def test_the_page_renders_from_a_record(tmp_path):
    scenario = SCENARIOS["registry_scale"]
    meta = {
        "commit": "0123456789abcdef",
        "dirty": False,
        "date": "2026-12-07T02:00:00+00:00",
        "machine": {"cores": 2},
        "command": "python -m bench --scenarios registry_scale",
    }
    rec = run.make_record(scenario, _raw(), meta, 600.0)
    for key, found in rec["tables"].items():
        assert all(len(row) == len(found["columns"]) for row in found["rows"]), key
    assert set(rec["tables"]) == set(scenario.tables)
    (tmp_path / "registry_scale.json").write_text(json.dumps(record.plain(rec)))
    pages = {p.name: p.read_text() for p in render.write_pages(tmp_path)}
    page = pages[scenario.page]
    assert f"## {scenario.title}" in page and "python -m bench --scenarios registry_scale" in page
    ready = "| ready after start, N tasks, s | efficientnet_lite0, 10,000 tasks | ≤ 15 |"
    assert f"{ready} 12.2 [12.0–12.4] |" in page
    assert "| 10,000 | 12.2 [12.0–12.4] | 10,000 | 0 | 2,850 | 1,425 | 50.0 | 5 | 0.100 |" in page
    assert "| tasks in turn, over budget | host | 10 | 1,000,000 | 1,050,000 | 0 | 150 | 140 |" in (
        page
    )
    assert "registry_scale.md" in pages["RESULTS.md"]  # its figures in the summary


def test_a_copy_reads_back_with_its_name_head_and_input_size(tmp_path):
    base = sorted(registry_scale.DEMO.glob("*.safetensors"))[0].read_bytes()
    rng = np.random.default_rng(0)
    data = registry_scale.variant(base, "t0042", rng, input_size=224)
    copy, orig = artifacts.read(data), artifacts.read(base)
    assert (copy.task, copy.input_size, copy.labels) == ("t0042", 224, orig.labels)
    assert torch.equal(copy.head_bias, orig.head_bias)
    assert not torch.equal(copy.head_weight, orig.head_weight)
    assert torch.allclose(copy.head_weight, orig.head_weight, rtol=0.5, atol=1e-6)
    assert copy.masks.keys() == orig.masks.keys()
    names = registry_scale.write_tasks(tmp_path, [base], 3, seed=0)
    assert [p.stem for p in sorted(tmp_path.iterdir())] == names


@pytest.mark.slow
def test_quick_mode_runs(tmp_path):
    options = Options(quick=True)
    raw = registry_scale.measure(SimpleNamespace(device="cpu", options=options, workdir=tmp_path))
    assert [r["listed"] for r in raw["scale"]] == list(registry_scale.QUICK["counts"])
    assert raw["nofile"]["answered"] == raw["nofile"]["sampled"]
    assert set(raw["cold"]["statuses"]) == {200} and set(raw["evict"]["statuses"]) == {200}
    assert raw["evict"]["tiers"]["host"]["evictions"] > 0
