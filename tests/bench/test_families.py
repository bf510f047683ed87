"""bench/scenarios/families.py: its quick mode end to end (two small families at 64 px,
seconds), the rows it reduces to, and a family that fails."""

from __future__ import annotations

import math

import pytest

from bench.scenarios import SCENARIOS, families


@pytest.fixture(scope="module")
def quick() -> dict:
    return families.run(families.QUICK, repeats=1, window_s=0.3, size=families.QUICK_SIZE)


def test_quick_run_measures_every_family(quick):
    assert quick["failed"] == []
    assert list(quick["beds"]) == list(families.QUICK)
    for bed in quick["beds"].values():
        assert bed["input_size"] == families.QUICK_SIZE
        assert set(bed["engine_vs_plain"]) == {str(n) for n in families.BATCHES}
        f = families.figures(bed)
        for column in families.COLUMNS[1:]:
            value = getattr(f[column], "median", f[column])
            assert math.isfinite(value) and value > 0, (bed["family"], column)
        # ~1% of the mask bits off: far under a bit per weight for the masks themselves
        assert 0.005 < bed["switched_off"] / bed["maskable_weights"] < 0.02
        assert bed["head_bytes"] < bed["artifact_bytes"]
        assert bed["task_state_bytes"] <= bed["task_state_bytes_one_pass"]


def test_a_row_per_family_in_the_declared_columns(quick):
    tables = families.summarize(quick)["tables"]
    columns = SCENARIOS["families"].tables["families"].columns
    assert [row[0] for row in tables["families"]] == list(families.QUICK)
    assert all(len(row) == len(columns) for row in tables["families"])
    assert tables["failed"] == []


def test_a_failing_family_is_reported_not_fatal(monkeypatch):
    def boom(family, *args):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(families, "measure_family", boom)
    results = families.run(["timm:resnet10t"], repeats=1, window_s=0.1)
    assert results["beds"] == {}
    assert families.summarize(results)["tables"]["failed"] == [
        ["timm:resnet10t", "RuntimeError: no such layer"]
    ]
